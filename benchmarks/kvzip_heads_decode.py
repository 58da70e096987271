"""KVzip's head-adaptive cache (per-head lengths, packed) against the per-layer adaptive one: decode speed and bytes.

One prompt, one process: each budget shape is compressed by `bench.measure_once` (prefill, reconstruction pass,
selection) and decoded by the fast decoder (the packed cache through `packed_kernel` on a GPU); a warm-up run
first, then the median of the repeats. Also checks the Triton kernel against the torch path at the model's shape.

    python benchmarks/kvzip_heads_decode.py --model llama3-8b --seq 32768 --ratio 0.1 --out $OUT/heads.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from chunkkv_cli.bench import environment, measure_once, random_prompt
from chunkkv_cli.compress import make_compressor
from chunkkv_cli.model import load_model
from chunkkv_cli.packed import PackedLayer, packed_attention

FIELDS = ("prefill_s", "compress_s", "decode_ms_per_token", "kv_bytes", "full_kv_bytes", "peak_prefill_bytes",
          "peak_decode_bytes")  # fmt: skip


def kernel_error(model, lengths: list[int]) -> float:
    """Largest difference between the Triton kernel and the fp32 torch path, at the model's head shape."""
    from chunkkv_cli.packed_kernel import packed_decode_attention

    config = model.config
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads, q_heads = config.num_key_value_heads, config.num_attention_heads
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    layer = PackedLayer(make(sum(lengths), dim), make(sum(lengths), dim), lengths)
    tail_k, tail_v, query = make(1, kv_heads, 64, dim), make(1, kv_heads, 64, dim), make(1, q_heads, 1, dim)
    got = packed_decode_attention(query, layer.prefix_keys, layer.prefix_values, layer.offsets, tail_k, tail_v,
                                  torch.tensor([37], dtype=torch.int32, device="cuda"), dim**-0.5, max(lengths))  # fmt: skip
    wide = PackedLayer(layer.prefix_keys.float(), layer.prefix_values.float(), lengths)
    expected = packed_attention(query.float(), wide, tail_k.float(), tail_v.float(), 37, dim**-0.5)
    return float((got.float() - expected).abs().max())


def measure(model, ids, params: dict, decode_tokens: int, repeats: int) -> dict:
    comp = make_compressor(params.pop("method", "kvzip"), **params)
    measure_once(model, ids, comp, 1, decode_tokens, decoder="fast")
    runs = [measure_once(model, ids, comp, 1, decode_tokens, decoder="fast") for _ in range(repeats)]
    row = {k: statistics.median(r[k] for r in runs) for k in FIELDS}
    row["runs_decode_ms_per_token"] = [r["decode_ms_per_token"] for r in runs]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    loaded = load_model(args.model, args.device, args.dtype, allow_random=True)
    model = loaded.model
    ids = random_prompt(model, 1, args.seq)
    report = {"command": "python benchmarks/kvzip_heads_decode.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "environment": environment(ids.device), "model": args.model, "random_weights": loaded.tokenizer is None,
              "rows": []}  # fmt: skip
    if ids.device.type == "cuda":
        report["kernel_max_abs_error_vs_fp32"] = kernel_error(model, [1, 300, 2000, 64, 700, 5, 4000, 128])
    variants = [{"method": "fullkv"}, {"ratio": args.ratio, "budget_shape": "adaptive"},
                {"ratio": args.ratio, "budget_shape": "heads"}]  # fmt: skip
    for params in variants:
        row = {"params": dict(params), **measure(model, ids, dict(params), args.decode_tokens, args.repeats)}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
