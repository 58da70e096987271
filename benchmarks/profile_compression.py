"""Where ChunkKV's compression time goes at one layer of a Llama-3-8B shape (run on a GPU).

    python benchmarks/profile_compression.py --seq 32768
"""

from __future__ import annotations

import argparse

import torch
from profile_decode import events_ms

from chunkkv_cli.compress import make_compressor
from chunkkv_cli.compress.base import gather_tokens, window_scores
from chunkkv_cli.compress.chunkkv import keep_top_chunks


def eager_ms(fn, iters=20):
    """Milliseconds per eager call (launches included), after three warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return events_ms(fn, iters)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--ratio", type=float, default=0.1)
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, 32, args.seq, 128, device=dev, dtype=dt)
    k = torch.randn(1, 8, args.seq, 128, device=dev, dtype=dt)
    comp = make_compressor("chunkkv", ratio=args.ratio)
    n_kept = comp.kept_tokens(args.seq)
    scores = window_scores(q, k, 32, 0.088).sum(1)
    idx = comp.select(q, k, 0, 32, 0.088)
    parts = {
        "window_scores": lambda: window_scores(q, k, 32, 0.088),
        "keep_top_chunks": lambda: keep_top_chunks(scores, 10, n_kept - 32),
        "gather K and V": lambda: (gather_tokens(k, idx), gather_tokens(k, idx)),
        "select (all scoring)": lambda: comp.select(q, k, 0, 32, 0.088),
    }
    for name, fn in parts.items():
        print(f"{name:22s} {eager_ms(fn):.3f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            comp.select(q, k, 0, 32, 0.088)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
