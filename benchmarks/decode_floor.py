"""The decode step against the memory-bandwidth floor (run on a GPU; random weights of a real shape).

    PYTHONPATH=$PWD python benchmarks/decode_floor.py --model llama3-8b --seqs 32768,131072 --out floor.json

For each document length and decoder: the first step's one-time cost (static buffers, compilation or a
cache hit, graph capture), the replayed step's milliseconds, the floor (weights + attended cache over the
measured copy bandwidth) and the GPU kernel time of one eager step by kind (matrix products, attention,
the rest). `--gemv` adds the matrix-vector products alone, as the model runs them and with q/k/v and
gate/up fused, against the same bandwidth: what any decoder built on these products can reach.
`--batch-methods clusterkv,fullkv --batch 8` adds ClusterKV (budget 1024) against FullKV at that batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from chunkkv_cli.bench import copy_bandwidth
from chunkkv_cli.fast_decode import FastDecoder
from chunkkv_cli.model import build_random_model
from chunkkv_cli.profiles import load_profile
from profile_decode import cuda_ms, prefilled  # noqa: E402  (this folder is on the path when a script here runs)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs a smoke test of the script only


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def gemv_rows(model, bandwidth: float) -> list[dict]:
    """Every layer's projections at batch 1, as separate products and with q/k/v and gate/up fused."""
    layers = model.model.layers
    x = torch.randn(1, model.config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    xi = torch.randn(1, model.config.intermediate_size, device=DEVICE, dtype=torch.bfloat16)
    a, m = layers[0].self_attn, layers[0].mlp
    shapes = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "gate": m.gate_proj, "up": m.up_proj}
    rows = []

    def add(name, weights, inp):
        ms = cuda_ms(lambda: [torch.nn.functional.linear(inp, w) for w in weights])
        n_bytes = sum(w.numel() * w.element_size() for w in weights)
        rows.append({"name": name, "ms": ms, "bytes": n_bytes, "of_copy_bandwidth": n_bytes / (ms / 1000) / bandwidth})

    for name in shapes:
        add(name, [getattr(l.self_attn if name in "qkvo" else l.mlp, f"{name}_proj").weight for l in layers], x)
    add("down", [l.mlp.down_proj.weight for l in layers], xi)
    add("lm_head", [model.lm_head.weight], x)
    qkv = [torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight]) for l in layers]
    add("qkv_fused", qkv, x)
    del qkv
    gate_up = [torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight]) for l in layers]
    add("gate_up_fused", gate_up, x)
    del gate_up
    torch.cuda.empty_cache()
    return rows


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    if any(k in name for k in ("gemv", "gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")):
        return "matmul"
    if "_split_attention" in name or "_merge_splits" in name or "packed" in name:
        return "attention"
    if name.startswith("triton_"):
        return "inductor_fused"
    return "other"


def kernel_breakdown(decoder, token) -> dict:
    """GPU time of one eager step by kind of kernel, and how many kernels it launches."""
    activity = torch.profiler.ProfilerActivity.CUDA if DEVICE == "cuda" else torch.profiler.ProfilerActivity.CPU
    decoder.use_graph = False
    decoder.step(token)
    with torch.profiler.profile(activities=[activity]) as prof:
        decoder.step(token)
        sync()
    decoder.use_graph = DEVICE == "cuda"
    kinds: dict[str, float] = {}
    launches = 0
    top = []
    for event in prof.key_averages():
        if event.device_time_total <= 0:
            continue
        kind = kind_of(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + event.device_time_total / 1000
        launches += event.count
        top.append((event.device_time_total / 1000, event.count, event.key[:90]))
    top.sort(reverse=True)
    return {"kernel_ms": kinds, "kernel_ms_total": sum(kinds.values()), "launches": launches, "top": top[:12]}


def decoder_row(model, method, seq, ratio, batch, decoder, steps, bandwidth) -> dict:
    target, pre, recall, kv = prefilled(model, method, seq, ratio, batch)
    kv_read = kv if recall is None else kv * min(1.0, 1024 / seq)
    token = pre.logits.argmax(-1).repeat_interleave(batch)
    del pre
    sync()
    start = time.perf_counter()
    dec = FastDecoder(model, target.cache, seq, 2 * steps + 16, compile=decoder == "compiled", recall=recall)
    dec.step(token)
    sync()
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        dec.step(token)
    sync()
    ms = 1000 * (time.perf_counter() - start) / steps
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = 1000 * (weights + kv_read) / bandwidth
    row = {"method": method, "seq": seq, "batch": batch, "decoder": decoder, "first_step_s": first_s,
           "ms_per_token": ms, "floor_ms": floor, "vs_floor": ms / floor, "kv_bytes": kv, "kv_read_bytes": kv_read}
    row.update(kernel_breakdown(dec, token))
    del dec, target
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seqs", default="32768")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--decoders", default="fast,compiled")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--gemv", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-methods", default="", help="e.g. clusterkv,fullkv: also timed at --batch")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    bandwidth = copy_bandwidth(torch.device(DEVICE))
    seqs = [int(s) for s in args.seqs.split(",")]
    model = build_random_model(load_profile(args.model), torch.device(DEVICE), torch.bfloat16 if DEVICE == "cuda" else torch.float32,
                               max_position_embeddings=max(seqs) + 1024)  # fmt: skip
    report = {"command": "python " + " ".join(sys.argv),
              "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "model": args.model,
              "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": []}  # fmt: skip
    if args.gemv:
        report["gemv"] = gemv_rows(model, bandwidth)
        print(json.dumps(report["gemv"]), flush=True)
    cases = [("chunkkv", seq, 1) for seq in seqs] + [(m, seqs[0], args.batch) for m in args.batch_methods.split(",") if m]
    for method, seq, batch in cases:
        for decoder in args.decoders.split(","):
            report["rows"].append(decoder_row(model, method, seq, args.ratio, batch, decoder, args.steps, bandwidth))
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
