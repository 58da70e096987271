"""Which attention kernel a blocked prefill's per-block attention should call: one layer of llama3.1-8b at 128k.

The unblocked prefill runs one causal SDPA call per layer (PyTorch picks the backend); the blocked prefill
attends each block of queries over every key up to its own, aligned to the bottom right. This times, over
one layer, the whole causal call and each way of doing the blocks, and checks each against the whole call.

    python benchmarks/prefix_attention_backends.py --out benchmarks/results/prefix_attention_backends_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

SEQ, BLOCK, HEADS, KV_HEADS, DIM = 131_072, 8192, 32, 8, 128


def timed(fn, repeats: int = 3):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        out = fn()
    end.record()
    torch.cuda.synchronize()
    return out, start.elapsed_time(end) / repeats / 1000


def cudnn(q, k, v, causal: bool, scale: float):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def flash(q, k, v, causal: bool, scale: float):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def merged(part, q, k, v, start: int, end: int, scale: float):
    """Block [start, end): the prefix (no mask) and the block's own keys (causal), merged by log-sum-exp."""
    own_out, own_lse = part(q, k[:, :, start:end], v[:, :, start:end], True, scale)
    if start == 0:
        return own_out
    pre_out, pre_lse = part(q, k[:, :, :start], v[:, :, :start], False, scale)
    pre_lse, own_lse = pre_lse.reshape(*pre_out.shape[:3], 1), own_lse.reshape(*own_out.shape[:3], 1)
    lse = torch.logaddexp(pre_lse, own_lse)
    return (pre_out.float() * torch.exp(pre_lse - lse) + own_out.float() * torch.exp(own_lse - lse)).to(q.dtype)


def folded(part, q, k, v, start: int, end: int, scale: float):
    """As `merged`, with K/V never given per query head: the prefix part folds each KV group's query heads into
    its rows (no mask, so rows may mix heads), the block's own part repeats its (short) K/V per query head."""
    b, heads, n, d = q.shape
    group = heads // k.shape[1]
    own_k, own_v = (t[:, :, start:end].repeat_interleave(group, dim=1) for t in (k, v))
    own_out, own_lse = part(q, own_k, own_v, True, scale)
    if start == 0:
        return own_out
    pre_out, pre_lse = part(q.reshape(b, k.shape[1], group * n, d), k[:, :, :start], v[:, :, :start], False, scale)
    pre_out, pre_lse = pre_out.reshape(b, heads, n, d), pre_lse.reshape(b, heads, n, 1)
    own_lse = own_lse.reshape(b, heads, n, 1)
    lse = torch.logaddexp(pre_lse, own_lse)
    return (pre_out.float() * torch.exp(pre_lse - lse) + own_out.float() * torch.exp(own_lse - lse)).to(q.dtype)


def by_blocks(block_fn, q, k, v):
    out = torch.empty_like(q)
    for start in range(0, SEQ, BLOCK):
        end = start + BLOCK
        out[:, :, start:end] = block_fn(q[:, :, start:end], k, v, start, end)
    return out


def variants(scale: float):
    def backend(kind):
        return lambda q, k, v: _with(kind, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True))

    return {
        "whole, default backend": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
        "whole, cudnn": backend(SDPBackend.CUDNN_ATTENTION),
        "whole, flash": backend(SDPBackend.FLASH_ATTENTION),
        "blocks, causal_lower_right (flash)": lambda q, k, v: by_blocks(
            lambda qb, k_, v_, s, e: F.scaled_dot_product_attention(qb, k_[:, :, :e], v_[:, :, :e], attn_mask=causal_lower_right(e - s, e), scale=scale, enable_gqa=True), q, k, v),
        "blocks, cudnn is_causal non-square": lambda q, k, v: by_blocks(
            lambda qb, k_, v_, s, e: cudnn(qb, k_[:, :, :e], v_[:, :, :e], True, scale)[0], q, k, v),
        "blocks, cudnn prefix + own merged": lambda q, k, v: by_blocks(
            lambda qb, k_, v_, s, e: merged(cudnn, qb, k_, v_, s, e, scale), q, k, v),
        "blocks, flash prefix + own merged": lambda q, k, v: by_blocks(
            lambda qb, k_, v_, s, e: merged(flash, qb, k_, v_, s, e, scale), q, k, v),
        "blocks, cudnn folded prefix + repeated own": lambda q, k, v: by_blocks(
            lambda qb, k_, v_, s, e: folded(cudnn, qb, k_, v_, s, e, scale), q, k, v),
        "blocks, flash folded prefix + repeated own": lambda q, k, v: by_blocks(
            lambda qb, k_, v_, s, e: folded(flash, qb, k_, v_, s, e, scale), q, k, v),
    }  # fmt: skip


def _with(kind, fn):
    with sdpa_kernel(kind):
        return fn()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HEADS, SEQ, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, KV_HEADS, SEQ, DIM, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    scale = DIM**-0.5
    rows, reference = {}, None
    for name, fn in variants(scale).items():
        try:
            out, seconds = timed(lambda: fn(q, k, v))
            reference = out if reference is None else reference
            rows[name] = {"seconds": seconds, "max_abs_diff_vs_whole": float((out.float() - reference.float()).abs().max())}
        except Exception as err:  # a backend that refuses these shapes
            rows[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        print(name, rows[name], file=sys.stderr, flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "seq": SEQ, "block": BLOCK,
              "command": " ".join(["python", *sys.argv]), "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
