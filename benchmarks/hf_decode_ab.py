"""The hf decoder on the full cache against ChunkKV's, steps interleaved in one process (random weights, bf16).

    PYTHONPATH=$PWD python benchmarks/hf_decode_ab.py --models gpt-oss-20b --out hf_decode_ab.json

One prefill fills both caches (fullkv and chunkkv at --ratio); then blocks of --block decode steps alternate
between them for --rounds rounds, so a drift of the host's speed lands on both. Per method: the median
milliseconds per step over the rounds, and one profiled step: aten ops dispatched, CUDA kernels launched and
their summed GPU time. If the compressed cache decodes slower while its step launches the same kernels for
less GPU time, the difference is the host's, not the step's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter

import torch
from torch.autograd import DeviceType

from chunkkv_cli.bench import environment, random_prompt
from chunkkv_cli.compress import make_compressor
from chunkkv_cli.generate import hf_step, kept_lengths, new_target, prefill, synchronize
from chunkkv_cli.model import build_random_model
from chunkkv_cli.profiles import load_profile

METHODS = ("fullkv", "chunkkv")


def profiled_step(step, token) -> dict:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if token.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step(token)
        synchronize(token.device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    return {"aten_ops": sum(e.name.startswith("aten::") for e in events), "cuda_kernels": len(kernels),
            "kernel_ms": sum(e.device_time for e in kernels) / 1000}  # fmt: skip


@torch.inference_mode()
def compare(model, ids, ratio: float, rounds: int, block: int) -> dict:
    """Both methods' hf decode on `ids`' caches: median ms per step over interleaved blocks, one step profiled."""
    targets = {"fullkv": new_target(model, make_compressor("fullkv")),
               "chunkkv": new_target(model, make_compressor("chunkkv", ratio=ratio))}  # fmt: skip
    pre = prefill(model, ids, list(targets.values()))
    kept = {m: dict(Counter(kept_lengths(t.cache))) for m, t in targets.items()}  # {tokens: layers holding them}
    token = pre.logits.argmax(-1)
    steps = {m: hf_step(model, t.cache, ids.shape[1]) for m, t in targets.items()}
    for method in METHODS:  # warm-up: kernels chosen, allocator grown
        for _ in range(3):
            steps[method](token)
    times = {m: [] for m in METHODS}
    for _ in range(rounds):
        for method in METHODS:
            synchronize(ids.device)
            start = time.perf_counter()
            for _ in range(block):
                steps[method](token)
            synchronize(ids.device)
            times[method].append(1000 * (time.perf_counter() - start) / block)
    rows = {m: {"layers_by_kept_tokens": kept[m], "ms_per_step": statistics.median(times[m]),
                "ms_per_step_rounds": times[m], **profiled_step(steps[m], token)} for m in METHODS}  # fmt: skip
    rows["chunkkv_over_fullkv_ms"] = rows["chunkkv"]["ms_per_step"] / rows["fullkv"]["ms_per_step"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="gpt-oss-20b,gemma-3-27b,qwen3-30b-a3b")
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"command": " ".join(["python", *sys.argv]), "environment": environment(device), "models": {}}
    for name in args.models.split(","):
        model = build_random_model(load_profile(name), device, torch.bfloat16)
        report["models"][name] = compare(model, random_prompt(model, 1, args.seq), args.ratio, args.rounds, args.block)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(args.out, "w") as file:
            json.dump(report, file, indent=1)
        print(name, json.dumps({m: report["models"][name][m]["ms_per_step"] for m in METHODS}), flush=True)


if __name__ == "__main__":
    main()
