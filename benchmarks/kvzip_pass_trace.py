"""KVzip's reconstruction pass on a GPU, whole: time and peak memory per phase, and the top CUDA kernels.

    python benchmarks/kvzip_pass_trace.py --model llama3-8b --seq 32768 --reach 0,2048 --out trace.json

Random weights of the profile's shape, bf16. For each --reach: a FullKV prefill (time, peak allocated), then the
pass alone (time, peak allocated above what the prefilled cache holds), median of --repeats after a warm-up; then
one profiled pass (torch.profiler) whose 15 most expensive CUDA kernels are listed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from chunkkv_cli.bench import environment, random_prompt
from chunkkv_cli.compress import make_compressor
from chunkkv_cli.compress.kvzip import reconstruction_scores
from chunkkv_cli.generate import new_target, prefill
from chunkkv_cli.model import load_model

REQUEST = list(range(100, 110))  # ten token ids standing in for the phrased request (random weights)


def timed(fn):
    """fn's result, seconds, and peak bytes allocated above what was allocated before (0 without CUDA)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) if cuda else 0


def one_round(model, ids, comp) -> dict:
    target = new_target(model, make_compressor("fullkv"))
    _, prefill_s, prefill_peak = timed(lambda: prefill(model, ids, [target]))
    _, pass_s, pass_peak = timed(lambda: reconstruction_scores(model, target.cache, ids, REQUEST, comp))
    return {"prefill_s": prefill_s, "pass_s": pass_s, "prefill_peak_above_start_gib": prefill_peak / 2**30,
            "pass_peak_above_cache_gib": pass_peak / 2**30}  # fmt: skip


def top_kernels(model, ids, comp, n: int = 15) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    target = new_target(model, make_compressor("fullkv"))
    prefill(model, ids, [target])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        reconstruction_scores(model, target.cache, ids, REQUEST, comp)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:n]
    return [{"kernel": e.key[:90], "calls": e.count, "ms": round(e.device_time_total / 1000, 1)} for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--reach", default="0", help="comma-separated kvzip reach values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device, dtype = ("cuda", "bf16") if torch.cuda.is_available() else ("cpu", "fp32")
    loaded = load_model(args.model, device, dtype, random_weights=True)
    model = loaded.model
    ids = random_prompt(model, 1, args.seq)
    report = {"command": "benchmarks/kvzip_pass_trace.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
              "environment": environment(ids.device), "rows": []}  # fmt: skip
    for reach in (int(r) for r in args.reach.split(",")):
        comp = make_compressor("kvzip", reach=reach)
        rounds = [one_round(model, ids, comp) for _ in range(args.repeats + 1)][1:]
        row = {key: sorted(r[key] for r in rounds)[len(rounds) // 2] for key in rounds[0]}
        row.update(reach=reach, pass_over_prefill=row["pass_s"] / row["prefill_s"],
                   whole_over_prefill=1 + row["pass_s"] / row["prefill_s"], top_kernels=top_kernels(model, ids, comp))  # fmt: skip
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
