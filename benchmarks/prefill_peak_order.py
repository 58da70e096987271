"""Prefill peak memory of two methods, measured alternately in one process (run on a GPU; random weights).

    PYTHONPATH=$PWD python benchmarks/prefill_peak_order.py --methods fullkv,kvzip --seqs 8192,32768 --out peak.json

`bench` measures FullKV first, then the method. A constant gap between the two could be the method's or
could be memory that the first run left behind (a library's workspace, the allocator's state): measuring
A, B, A, B and comparing each run with its neighbours tells which. Peaks are reported above the memory
allocated before each prefill (the weights and whatever earlier runs left).
"""

from __future__ import annotations

import argparse
import json

import torch

from chunkkv_cli.bench import PeakMemory, random_prompt, release_memory
from chunkkv_cli.compress import make_compressor
from chunkkv_cli.generate import new_target, prefill
from chunkkv_cli.model import build_random_model
from chunkkv_cli.profiles import load_profile


def one_prefill(model, ids, method: str, ratio: float) -> dict:
    device = ids.device
    release_memory(device)
    before = torch.cuda.memory_allocated(device)
    target = new_target(model, make_compressor(method, ratio=ratio))
    with PeakMemory(device) as peak:
        prefill(model, ids, [target])
    held = torch.cuda.memory_allocated(device) - before
    del target
    release_memory(device)
    return {"method": method, "seq": ids.shape[1], "peak_bytes": peak.peak, "peak_above_start": peak.peak - before,
            "held_after_bytes": held, "allocated_before": before}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--methods", default="fullkv,kvzip")
    parser.add_argument("--seqs", default="8192,32768")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    model = build_random_model(load_profile(args.model), torch.device("cuda"), torch.bfloat16,
                               max_position_embeddings=max(seqs) + 1024)  # fmt: skip
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model, "rows": []}
    for seq in seqs:
        ids = random_prompt(model, 1, seq)
        for _ in range(args.rounds):
            for method in args.methods.split(","):
                row = one_prefill(model, ids, method, args.ratio)
                report["rows"].append(row)
                print(json.dumps({k: (v / 2**30 if "bytes" in k or "above" in k or "before" in k else v) for k, v in row.items()}), flush=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
