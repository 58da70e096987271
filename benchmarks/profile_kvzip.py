"""Where the reconstruction pass spends its time on a GPU: one layer's repeat piece, part by part.

    python benchmarks/profile_kvzip.py --seq 32768 --piece 2048      # llama3-8b attention shape, bf16
Prints milliseconds per call (CUDA events, median of 20 after warm-up) for the flash parts, the merge,
the full-normalisation score kernel, the local scores, and the whole GPU attention; and the same per pass
(x pieces x layers) against a causal flash prefill of the whole sequence in one layer, x layers.
"""

from __future__ import annotations

import argparse
import json

import torch

from chunkkv_cli import kvzip_kernels


def ms(fn, iters=20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--piece", type=int, default=2048)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    dev, dt, d = "cuda", torch.bfloat16, 128
    n, L, hq, hkv = args.piece, args.seq, args.q_heads, args.kv_heads
    g = hq // hkv
    q = torch.randn(1, hq, n, d, device=dev, dtype=dt)
    k = torch.randn(1, hkv, L + n, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    scale = d ** -0.5
    folded = q.reshape(1, hkv, g * n, d)
    lse = torch.randn(1, hkv, g * n, device=dev, dtype=torch.float32) + 10
    parts = {
        "doc_flash": ms(lambda: kvzip_kernels._flash(folded, k[:, :, :L], v[:, :, :L], False, scale)),
        "own_flash": ms(lambda: kvzip_kernels._flash(q, k[:, :, L:].repeat_interleave(g, 1), v[:, :, L:].repeat_interleave(g, 1), True, scale)),
        "scores": ms(lambda: kvzip_kernels.best_weights(folded, k[:, :, :L], lse, scale)),
        "attend": ms(lambda: kvzip_kernels.attend(q, k[:, :, :L], v[:, :, :L], k[:, :, L:], v[:, :, L:], scale)),
        "local_scores": ms(lambda: kvzip_kernels.local_scores(q, k, lse, (0, n), 4, scale)),
        "cache_cat": ms(lambda: torch.cat([k[:, :, :L], k[:, :, L:]], dim=2)),
    }
    qf = torch.randn(1, hq, L, d, device=dev, dtype=dt)
    kf = torch.randn(1, hq, L, d, device=dev, dtype=dt)
    parts["prefill_causal_flash_one_layer"] = ms(lambda: kvzip_kernels._flash(qf, kf, kf, True, scale))
    pieces = -(-L // n)
    per_pass = {name: round(t * pieces * args.layers / 1000, 3) for name, t in parts.items() if name != "prefill_causal_flash_one_layer"}
    per_pass["prefill_attention_all_layers"] = round(parts["prefill_causal_flash_one_layer"] * args.layers / 1000, 3)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "settings": vars(args), "ms_per_call": parts, "seconds_per_pass": per_pass}, indent=2))


if __name__ == "__main__":
    main()
