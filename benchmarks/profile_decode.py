"""Where a decode step's time goes on the compressed cache (run on a GPU).

    python benchmarks/profile_decode.py --seq 32768 --out decode_profile.json

Part 1 times one layer's decode attention, replayed from a CUDA graph: the split-KV Triton kernel,
GQA packed into SDPA with a slot mask (the fallback), and SDPA without a mask as a reference.
Part 2 builds the llama3-8b shape with random weights, prefills `--seq` tokens with ChunkKV and
fullkv, and times the fast decoder's setup, graph capture and replayed steps with either attention,
next to the GPU kernel time of one eager step (the part a CUDA graph cannot remove) and the
memory-bandwidth floor (weights + cache bytes over measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from chunkkv_cli.bench import copy_bandwidth
from chunkkv_cli.compress import make_compressor
from chunkkv_cli.compress.base import group_queries, grouped_decode_attention
from chunkkv_cli.decode_kernel import decode_attention
from chunkkv_cli.fast_decode import FastDecoder
from chunkkv_cli.generate import new_target, prefill
from chunkkv_cli.model import build_random_model
from chunkkv_cli.pipeline import recall_state
from chunkkv_cli.profiles import load_profile


def cuda_ms(fn, iters=50) -> float:
    """Milliseconds per call of `fn` replayed from a CUDA graph: kernel time, no launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def events_ms(fn, iters) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def reference_attention(query, key, value, scaling, mask):
    b, q_heads, _, d = query.shape
    packed = group_queries(query, key.shape[1]).squeeze(-2).float()  # (b, kv, g, d)
    scores = torch.matmul(packed, key.float().transpose(-1, -2)) * scaling
    scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(-1), value.float())
    return out.reshape(b, 1, q_heads, d)


def attention_table(shapes) -> list[dict]:
    rows = []
    for batch, n in shapes:
        q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, 8, n + 256, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = torch.zeros(batch, n + 256, dtype=torch.bool, device="cuda")
        mask[:, :n] = True
        lengths = torch.full((batch,), n, dtype=torch.int32, device="cuda")
        variants = {
            "triton": lambda: decode_attention(q, k, v, lengths, 0.088),
            "sdpa_mask": lambda: grouped_decode_attention(q, k, v, 0.088, mask),
            "sdpa_nomask": lambda: grouped_decode_attention(q, k, v, 0.088, None),
        }
        kv_bytes = 2 * batch * 8 * n * 128 * 2
        row = {"batch": batch, "tokens": n, "kv_mb": kv_bytes / 1e6}
        for name, fn in variants.items():
            row[f"{name}_ms"] = cuda_ms(fn)
        row["triton_gb_s"] = kv_bytes / row["triton_ms"] / 1e6
        ref = reference_attention(q, k, v, 0.088, mask)
        row["triton_max_err"] = float((decode_attention(q, k, v, lengths, 0.088).float() - ref).abs().max())
        rows.append(row)
        print(row, flush=True)
    return rows


def kernel_table(decoder, rows=25) -> tuple[float, str]:
    """GPU kernel time of one eager step (what a CUDA graph cannot remove) and its top kernels."""
    token = torch.zeros(decoder.token.shape[0], device="cuda", dtype=torch.long)
    decoder.use_graph = False
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decoder.step(token)
        torch.cuda.synchronize()
    decoder.use_graph = True
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 1000
    return total, events.table(sort_by="cuda_time_total", row_limit=rows)


def prefilled(model, method: str, seq: int, ratio: float, batch: int):
    """A random `seq`-token prompt prefilled with `method` (ClusterKV: budget 1024), its cache copied to `batch`
    sequences: (target, prefill result, the per-step route or None, cache bytes)."""
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device=next(model.parameters()).device)
    compressor = make_compressor(method, budget=1024) if method == "clusterkv" else make_compressor(method, ratio=ratio)
    target = new_target(model, compressor)
    pre = prefill(model, ids, [target])
    for layer in target.cache.layers:
        layer.batch_repeat_interleave(batch)
    recall = recall_state(compressor, target.cache)
    kv_bytes = sum(t.numel() * t.element_size() for layer in target.cache.layers for t in (layer.keys, layer.values))
    return target, pre, recall, kv_bytes


def decoder_timing(
    model, method: str, seq: int, ratio: float, batch: int, steps: int, compile: bool, print_table: bool = False
) -> dict:
    target, pre, recall, kv_bytes = prefilled(model, method, seq, ratio, batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    decoder = FastDecoder(model, target.cache, seq, steps + 8, compile=compile, recall=recall)
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - start
    token = pre.logits.argmax(-1).repeat_interleave(batch)
    start = time.perf_counter()
    decoder.step(token)
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - start
    replay_ms = events_ms(lambda: decoder.step(token), iters=steps)
    kernel_ms, table = kernel_table(decoder)
    if print_table:
        print(table, flush=True)
    return {"method": method, "batch": batch, "kv_bytes": kv_bytes, "setup_s": setup_s, "capture_s": capture_s,
            "replay_ms": replay_ms, "eager_kernel_ms": kernel_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--variants", default="triton,compiled", help="triton, compiled, sdpa_mask")
    parser.add_argument("--methods", default="chunkkv,fullkv")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--fullkv-batches", action="store_true", help="time fullkv at every batch, not only 1")
    parser.add_argument("--tables", default="chunkkv", help="methods whose kernel table is printed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = {"bandwidth_gb_s": copy_bandwidth(torch.device("cuda")) / 1e9}
    if not args.skip_attention:
        report["attention"] = attention_table([(1, args.seq // 10), (1, args.seq), (16, args.seq // 10), (64, args.seq // 10)])
    model = build_random_model(load_profile("llama3-8b"), torch.device("cuda"), torch.bfloat16, max_position_embeddings=args.seq + 1024)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report["weight_bytes"] = weight_bytes
    rows = []
    for variant in args.variants.split(","):
        if variant == "sdpa_mask":
            os.environ["CHUNKKV_NO_TRITON"] = "1"
        for batch in [int(b) for b in args.batches.split(",")]:
            for method in args.methods.split(","):
                if method == "fullkv" and batch > 1 and not args.fullkv_batches:
                    continue
                timing = decoder_timing(
                    model, method, args.seq, args.ratio, batch, 50, variant == "compiled", method in args.tables.split(",")
                )
                row = {"attention": variant, **timing}
                row["floor_ms"] = 1000 * (weight_bytes + row["kv_bytes"]) / (report["bandwidth_gb_s"] * 1e9)
                rows.append(row)
                print(row, flush=True)
                torch.cuda.empty_cache()
    report["decoder"] = rows
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
