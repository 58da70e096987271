"""Blocked prefill on one GPU: peak memory and prefill time against the unblocked pass, and `memory`'s prediction.

For each model (random weights of the profile's shape, bf16, batch 1) and length:
  * chunkkv at 0.1, unblocked (today's path), on the whole GPU;
  * chunkkv at 0.1, blocked at the automatic size, under torch.cuda.set_per_process_memory_fraction so that the
    process may allocate no more than a 24 GB card holds;
  * fullkv, blocked at the automatic size, on the whole GPU (its full cache alone outgrows 24 GB at 128k).
Each prefill runs twice and the second is reported (the first warms the kernels at that length). Peaks are
torch.cuda.max_memory_allocated around the prefill, as `chunkkv bench` measures them; the prediction is
`memory.prefill_peak` at the block the prefill chose. Ratios compare runs of one process.

    python benchmarks/blocked_prefill.py --out benchmarks/results/blocked_prefill_h200.json
    python benchmarks/blocked_prefill.py --cpu-check   (smollm2-135m at 1k on the CPU: the script runs)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from chunkkv_cli.bench import PeakMemory, environment, random_prompt, release_memory
from chunkkv_cli.compress import make_compressor
from chunkkv_cli.generate import new_target, prefill
from chunkkv_cli.memory import prefill_peak
from chunkkv_cli.model import build_random_model
from chunkkv_cli.profiles import load_profile

CARD_BYTES = 24 * 10**9  # the emulated card: what an RTX 4090 / L4 / A10 process may allocate, at most
GIB = 2**30
LONG = 65536  # from this length on, also other block sizes
SWEEP = ()  # e.g. (4096, 16384): prefill time and peak at other blocks, 10 s each at 128k
PLAN = {"llama3.1-8b": ["32k", "128k"], "qwen2.5-7b": ["32k"], "mistral-7b": ["32k"]}


def limit_memory(device, card_bytes: int | None) -> None:
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if card_bytes is None else card_bytes / total, device)


def one_prefill(model, ids, method: str, block: int | None, repeats: int) -> dict:
    """The last of `repeats` prefills: seconds, peak bytes, block, first-token logits and kept indices."""
    device = ids.device
    for _ in range(repeats):
        release_memory(device)
        target = new_target(model, make_compressor(method, ratio=0.1), record=True)
        with PeakMemory(device) as peak:
            pre = prefill(model, ids, [target], block=block)
    kept = [target.kept[i] for i in sorted(target.kept)]
    return {"prefill_s": pre.seconds, "peak_bytes": peak.peak, "block": pre.block, "logits": pre.logits, "kept": kept}


def compare(blocked: dict, whole: dict) -> dict:
    """How close the blocked prefill's outputs are to the unblocked ones (random weights: logits, kept tokens)."""
    same = [torch.equal(a, b) for a, b in zip(blocked["kept"], whole["kept"])]
    overlap = [
        len(set(a.flatten().tolist()) & set(b.flatten().tolist())) / max(1, len(set(b.flatten().tolist())))
        for a, b in zip(blocked["kept"], whole["kept"])
    ]
    return {
        "same_first_token": bool(torch.equal(blocked["logits"].argmax(-1), whole["logits"].argmax(-1))),
        "logits_max_abs_diff": float((blocked["logits"] - whole["logits"]).abs().max()),
        "layers_with_identical_kept_tokens": sum(same),
        "kept_token_overlap_min": min(overlap),
    }


def row(name: str, result: dict, predicted: int | None = None) -> dict:
    out = {"case": name, "prefill_s": result["prefill_s"], "peak_bytes": result["peak_bytes"],
           "peak_gib": result["peak_bytes"] / GIB if result["peak_bytes"] else None, "block": result["block"]}  # fmt: skip
    if predicted is not None and result["peak_bytes"]:
        out.update(predicted_bytes=predicted, prediction_error=predicted / result["peak_bytes"] - 1)
    return out


def other_blocks(model, profile, ids, dtype: str) -> list[dict]:
    """At the longest length: chunkkv at smaller and larger blocks than the automatic one."""
    seq = ids.shape[1]
    return [row(f"chunkkv 0.1, block {block}", one_prefill(model, ids, "chunkkv", block, 1),
                prefill_peak(profile, dtype, seq, block, ratio=0.1)) for block in SWEEP]  # fmt: skip


def measure_length(model, profile, seq: int, repeats: int, card_bytes: int | None) -> dict:
    """The three prefills at one length, their prediction, and the issue's targets as booleans."""
    device = next(model.parameters()).device
    ids = random_prompt(model, 1, seq)
    is_cuda = device.type == "cuda"
    whole = one_prefill(model, ids, "chunkkv", seq, repeats)
    if is_cuda:
        limit_memory(device, card_bytes)
    try:
        small = one_prefill(model, ids, "chunkkv", None if is_cuda else 256, repeats)
    finally:
        if is_cuda:
            limit_memory(device, None)
    full = one_prefill(model, ids, "fullkv", None if is_cuda else 256, 1)
    dtype = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    full_cache = 2 * seq * profile.num_layers * profile.num_kv_heads * profile.head_dim * (2 if dtype == "bf16" else 4)
    rows = [
        row("chunkkv 0.1, unblocked", whole, prefill_peak(profile, dtype, seq, seq, ratio=0.1)),
        row(f"chunkkv 0.1, blocked, {card_bytes / 1e9:.0f} GB card" if card_bytes else "chunkkv 0.1, blocked", small,
            prefill_peak(profile, dtype, seq, small["block"], ratio=0.1)),
        row("fullkv, blocked", full, prefill_peak(profile, dtype, seq, full["block"], ratio=1.0)),
    ]  # fmt: skip
    targets = {
        "chunkkv_peak_le_22gib": bool(small["peak_bytes"] and small["peak_bytes"] <= 22 * GIB),
        "chunkkv_prefill_ratio": small["prefill_s"] / whole["prefill_s"],
        "chunkkv_prefill_le_1.1x": small["prefill_s"] <= 1.1 * whole["prefill_s"],
        "fullkv_peak_le_weights_full_cache_3gb": bool(full["peak_bytes"] and full["peak_bytes"] <= weights + full_cache + 3 * 10**9),
        "fullkv_headroom_bytes": (full["peak_bytes"] or 0) - weights - full_cache,
    }  # fmt: skip
    if is_cuda and seq >= LONG:
        rows += other_blocks(model, profile, ids, dtype)
    return {"seq": seq, "weights_bytes": weights, "full_cache_bytes": full_cache, "rows": rows,
            "blocked_vs_unblocked": compare(small, whole), "targets": targets}  # fmt: skip


def run_model(name: str, seqs: list[str], device: torch.device, repeats: int, card_bytes: int | None) -> dict:
    from chunkkv_cli.memory import parse_size

    profile = load_profile(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_random_model(profile, device, dtype)
    lengths = []
    for seq in seqs:
        start = time.perf_counter()
        try:
            lengths.append({**measure_length(model, profile, parse_size(seq), repeats, card_bytes),
                            "wall_s": time.perf_counter() - start})  # fmt: skip
        except Exception as err:  # one failure (an out-of-memory) must not lose the other lengths' figures
            lengths.append({"seq": seq, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
        print(json.dumps(lengths[-1].get("targets", lengths[-1])), file=sys.stderr, flush=True)
    del model
    release_memory(device)
    return {"model": name, "lengths": lengths}


def flash_probe(device) -> bool:
    """Whether a llama-shaped block (8k queries of 32 heads over 32k keys of 8) gets flash attention here."""
    from chunkkv_cli.blocked import flash_applies

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k = torch.empty(1, 32, 8192, 128, device=device, dtype=dtype), torch.empty(1, 8, 32768, 128, device=device, dtype=dtype)
    return flash_applies(q, k, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-check", action="store_true", help="smollm2-135m at 1k on the CPU: that the script runs")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_check else "cpu")
    plan = {"smollm2-135m": ["1k"]} if args.cpu_check else PLAN
    card = CARD_BYTES if device.type == "cuda" else None
    report = {"environment": environment(device), "command": " ".join(["python", *sys.argv]),
              "prefix_attention_flash": flash_probe(device),
              "card_bytes_emulated": card, "random_weights": True, "batch": 1, "models": []}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, seqs in plan.items():  # written after each model, so a run cut short keeps what it measured
        report["models"].append(run_model(name, seqs, device, 2, card))
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
