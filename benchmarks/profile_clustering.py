"""Where ClusterKV's clustering time goes after a long prefill (run on a GPU).

    python benchmarks/profile_clustering.py --seq 32768 --batch 1 --out clustering.json

Prefills the llama3-8b shape (random weights) once, then times `ClusterState.build` on its cache
a few times, and prints the GPU kernels of one build, heaviest first.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from profile_decode import cuda_ms

from chunkkv_cli.compress import make_compressor
from chunkkv_cli import cluster_kernels
from chunkkv_cli.cluster_kernels import select_clusters
from chunkkv_cli.compress.clusterkv import ClusterState, select_tokens
from chunkkv_cli.generate import new_target, prefill
from chunkkv_cli.model import build_random_model
from chunkkv_cli.profiles import load_profile


def selection_ms(state: ClusterState, batch: int) -> dict:
    """One layer's per-step selection at a 1k budget: the Triton kernels vs the PyTorch ops, replayed from a graph."""
    layer = state.layers[-1]
    query = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    sinks, room = 16, 1024 - 16 - 128
    args = (query, layer.centroids, layer.order, layer.offsets)
    times = {"select_torch_ms": cuda_ms(lambda: select_tokens(*args, room))}
    default = cluster_kernels.RANK_WARPS
    for warps in (4, 8, 16):
        cluster_kernels.RANK_WARPS = warps
        times[f"select_triton_{warps}warps_ms"] = cuda_ms(lambda: select_clusters(*args, sinks, room))
    cluster_kernels.RANK_WARPS = default
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = build_random_model(load_profile("llama3-8b"), torch.device("cuda"), torch.bfloat16, max_position_embeddings=args.seq + 64)
    compressor = make_compressor("clusterkv", budget=1024)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda")
    prefill(model, ids[:, :1024], [new_target(model, compressor)])  # warm-up: the first prefill pays for cuBLAS set-up
    target = new_target(model, compressor)
    torch.cuda.synchronize()
    start = time.perf_counter()
    prefill(model, ids, [target])
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    for layer in target.cache.layers:
        layer.batch_repeat_interleave(args.batch)
    ClusterState.build(compressor, target.cache)  # warm-up
    seconds = [ClusterState.build(compressor, target.cache).seconds for _ in range(args.repeats)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        state = ClusterState.build(compressor, target.cache)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), flush=True)
    report = {"seq": args.seq, "batch": args.batch, "prefill_s": prefill_s, "build_s": seconds,
              "share_of_prefill": min(seconds) / (prefill_s * args.batch), **selection_ms(state, args.batch)}  # fmt: skip
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
