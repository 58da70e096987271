"""Launch settings of the decode kernels, swept on real shapes (llama3-8b: 32 query heads, 8 KV heads, d 128, bf16).

    PYTHONPATH=$PWD python benchmarks/decode_kernel_sweep.py --out decode_kernel_sweep.json

Per shape, 32 launches (one per layer, each on its own buffers so nothing is served from L2) are captured as
one CUDA graph and replayed; reported: microseconds per launch for every setting, and each output's largest
difference from the current setting's (a setting that computes something else is marked, never picked).
Shapes: ChunkKV at 10 % of 32k and 128k (batch 1), FullKV at 32k (batch 8), ClusterKV's attention (ranking
included) and its ranking with the slots listed (budget 1024, 400 clusters, 32k, batch 8, 30 clustered layers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from chunkkv_cli import cluster_kernels, decode_kernel

LAYERS, Q_HEADS, KV_HEADS, D = 32, 32, 8, 128
NEW = 256


def graph_us(calls, repeats: int = 20) -> tuple[float, list]:
    """Microseconds per call of `calls` (a list of thunks) replayed as one CUDA graph, and the last outputs."""
    outs = [c() for c in calls]  # compiles the kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [c() for c in calls]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats / len(calls), outs


def dense_calls(batch: int, kept: int):
    """Thunks for one attention launch per layer over `kept` filled slots."""
    capacity = kept + NEW
    g = torch.Generator(device="cuda").manual_seed(0)
    calls = []
    for _ in range(LAYERS):
        q = torch.randn(batch, Q_HEADS, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(batch, KV_HEADS, capacity, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "kv")
        lengths = torch.full((batch,), kept + 8, device="cuda", dtype=torch.int32)
        calls.append(lambda q=q, k=k, v=v, n=lengths: decode_kernel.decode_attention(q, k, v, n, 0.088))
    return calls


def cluster_calls(what: str, batch: int = 8, tokens: int = 32768, clusters: int = 400, sinks: int = 16, room: int = 1008):
    """ClusterKV's clustered layers (budget 1024): `what` is "attend" (ranking and attention), "select" (ranking and
    listing the slots) or "rank" (ranking alone)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    calls = []
    for _ in range(LAYERS - 2):
        q = torch.randn(batch, Q_HEADS, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
        c = torch.nn.functional.normalize(torch.randn(batch, KV_HEADS, clusters, D, device="cuda", generator=g), dim=-1)
        c = c.to(torch.bfloat16)  # as ClusterState keeps them
        assign = torch.randint(0, clusters, (batch, KV_HEADS, tokens - sinks), device="cuda", generator=g)
        order = assign.argsort(dim=-1) + sinks
        counts = torch.zeros(batch, KV_HEADS, clusters, dtype=torch.long, device="cuda").scatter_add_(2, assign, torch.ones_like(assign))
        offsets = torch.nn.functional.pad(counts.cumsum(-1), (1, 0))
        if what == "select":
            calls.append(lambda q=q, c=c, o=order, f=offsets: cluster_kernels.select_clusters(q, c, o, f, sinks, room))
            continue
        if what == "rank":
            calls.append(lambda q=q, c=c, o=order, f=offsets: cluster_kernels._rank(q, c, o, f, sinks, room, 0).shift)
            continue
        k, v = (torch.randn(batch, KV_HEADS, tokens + NEW, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "kv")
        lengths = torch.full((batch,), sinks + room + 8, device="cuda", dtype=torch.int32)
        calls.append(lambda q=q, k=k, v=v, c=c, o=order, f=offsets, n=lengths:
                     cluster_kernels.cluster_attention(q, k, v, c, o, f, n, sinks, room, tokens, 0.088))  # fmt: skip
    return calls


def sweep(name: str, calls, module, grid: dict) -> list[dict]:
    defaults = {key: getattr(module, key) for key in grid}
    base_us, base = graph_us(calls)
    rows = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        for key, value in setting.items():
            setattr(module, key, value)
        try:
            us, outs = graph_us(calls)
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs, base))
            rows.append({"shape": name, **setting, "us": round(us, 2), "max_diff": diff})
        except Exception as error:  # a setting Triton cannot build (shared memory, registers)
            rows.append({"shape": name, **setting, "error": str(error).splitlines()[0][:200]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    for key, value in defaults.items():
        setattr(module, key, value)
    rows.append({"shape": name, **defaults, "us": round(base_us, 2), "current": True})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="", help="comma-separated shape names (default: all)")
    args = parser.parse_args()
    wanted = set(filter(None, args.only.split(",")))
    attention_grid = {"TARGET_PROGRAMS": [256, 512, 1024, 2048], "BLOCK_N": [32, 64, 128], "NUM_WARPS": [2, 4, 8]}
    shapes = {"chunkkv_b1_32k": (1, 3277), "chunkkv_b1_128k": (1, 13107), "fullkv_b8_32k": (8, 32768)}
    rows = []
    for name, (batch, kept) in shapes.items():
        if not wanted or name in wanted:
            rows += sweep(name, dense_calls(batch, kept), decode_kernel, attention_grid)
            torch.cuda.empty_cache()
    cluster_grid = {"RANKED_TARGET_PROGRAMS": [512, 1024, 2048], "RANKED_WARPS": [2, 4], "BLOCK_N": [32, 64]}
    if not wanted or "clusterkv_b8_32k" in wanted:
        rows += sweep("clusterkv_b8_32k", cluster_calls("attend"), decode_kernel, cluster_grid)
        torch.cuda.empty_cache()
    rank_grid = {"RANK_WARPS": [2, 4, 8], "RANK_BLOCK_C": [128, 256, 512]}
    for name, what in (("clusterkv_rank_b8_32k", "select"), ("clusterkv_rankonly_b8_32k", "rank")):
        if not wanted or name in wanted:
            rows += sweep(name, cluster_calls(what), cluster_kernels, rank_grid)
    best = {}
    for row in rows:
        if "us" in row and row.get("max_diff", 0) <= 0.02 and row["us"] < best.get(row["shape"], {"us": 1e9})["us"]:
            best[row["shape"]] = row
    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "best": best, "rows": rows}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
