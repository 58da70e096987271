"""ClusterKV's two hot loops as Triton kernels: assigning keys to centroids, and choosing clusters per step.

`nearest_centroids` (k-means and the final assignment): PyTorch computes the full (tokens x clusters)
similarity matrix, writes it out and reads it back for the max; at 32k tokens and 400 clusters per
head that round trip costs more than the matrix product. Here each program multiplies a tile of
keys by every centroid in turn and keeps only the running best.

Choosing clusters (each decode step, each layer): in PyTorch about twenty small kernels (scores,
argsort, cumulative sizes, searchsorted, gathers, concatenation), whose launches cost more than
reading the chosen tokens. Here one program per (sequence, KV head) scores the centroids against
the summed group query, sorts them, and lays the members of the ranked clusters end to end (`_rank`).
`cluster_attention` (the fast decoders) hands that layout to the split-KV attention kernel, which
finds each slot's token itself; `select_clusters` (the hf decoder) lists the positions.
"""

from __future__ import annotations

import torch

from chunkkv_cli import decode_kernel
from chunkkv_cli.decode_kernel import available, triton

if triton is not None:
    import triton.language as tl

    from chunkkv_cli.decode_kernel import load_group_query, ranked_rows

__all__ = ["available", "cluster_attention", "nearest_centroids", "select_clusters"]

BLOCK_C = 32  # centroids per tile in nearest_centroids
RANK_BLOCK_C = 512  # centroids scored per tile when ranking
RANK_WARPS = 8  # 400 bf16 centroids, batch 8: 10.9 us a layer vs 16.8 at 4 warps / 256 (decode_kernel_sweep.py, H200)
BLOCK_M = 64  # output slots per program
BLOCK_N = 128  # keys per program in nearest_centroids


def nearest_centroids(keys: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each key's most similar unit centroid: (cosine similarity float32, index int64), both (batch, heads, n).

    keys (batch, heads, n, d), any norm; centroids (batch, heads, C, d), unit. Products are taken in
    the keys' precision. Triton on a GPU; on the CPU the similarity matrix is formed explicitly.
    """
    if not available(keys.device, keys.shape[-1]):
        best, index = (keys @ centroids.to(keys.dtype).transpose(-1, -2)).max(dim=-1)  # argmax ignores |key|
        return best.float() / keys.float().norm(dim=-1).clamp_min(1e-12), index
    return _nearest(keys, centroids.to(keys.dtype))


@torch.library.custom_op("chunkkv::nearest_centroids", mutates_args=())
def _nearest(keys: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = keys.shape
    n_clusters = centroids.shape[2]
    rows_k, rows_c = keys.reshape(b * h, n, d), centroids.reshape(b * h, n_clusters, d)
    best = torch.empty(b * h, n, dtype=torch.float32, device=keys.device)
    index = torch.empty(b * h, n, dtype=torch.long, device=keys.device)
    _nearest_kernel[(b * h, triton.cdiv(n, BLOCK_N))](
        rows_k, rows_c, best, index, n, n_clusters,
        rows_k.stride(0), rows_k.stride(1), rows_c.stride(0), rows_c.stride(1), D=d, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
    )  # fmt: skip
    return best.view(b, h, n), index.view(b, h, n)


@_nearest.register_fake
def _(keys, centroids):
    return keys.new_empty(keys.shape[:3], dtype=torch.float32), keys.new_empty(keys.shape[:3], dtype=torch.long)


@torch.library.custom_op("chunkkv::select_clusters", mutates_args=())
def select_clusters(
    query: torch.Tensor, centroids: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, sinks: int, room: int
) -> torch.Tensor:
    """Positions to attend: the `sinks` first tokens, then members of the best clusters, cut to `room`.

    query (b, q_heads, 1, d); centroids (b, kv_heads, C, d); order/offsets: the clusters' members in
    CSR form (see `clusterkv.members`), which must hold at least `room` tokens. Returns int64
    (b, kv_heads, sinks + room), the same positions as `clusterkv.select_tokens` after the sinks.
    Two kernels: one program per (sequence, KV head) ranks the clusters; then many per head fill the slots.
    """
    b, kv_heads = query.shape[0], centroids.shape[1]
    ranked = _rank(query, centroids, order, offsets, sinks, room, 0)
    out = torch.empty(b, kv_heads, sinks + room, dtype=torch.long, device=query.device)
    c_pad = ranked.ends.shape[-1]
    _fill_kernel[(b * kv_heads, triton.cdiv(sinks + room, BLOCK_M))](
        order, ranked.ends, ranked.shift, out, *order.stride()[:2], *out.stride()[:2], sinks, room,
        KV_HEADS=kv_heads, C_PAD=c_pad, BLOCK_M=BLOCK_M,
    )  # fmt: skip
    return out


@select_clusters.register_fake
def _(query, centroids, order, offsets, sinks, room):
    return query.new_empty(query.shape[0], centroids.shape[1], sinks + room, dtype=torch.long)


@torch.library.custom_op("chunkkv::cluster_attention", mutates_args=())
def cluster_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, centroids: torch.Tensor, order: torch.Tensor,
    offsets: torch.Tensor, lengths: torch.Tensor, sinks: int, room: int, tail_start: int, scaling: float,
) -> torch.Tensor:
    """One decode step's attention over what `select_clusters` chooses, then the buffer from `tail_start` on.

    key/value (b, kv_heads, capacity, d); lengths (b,): slots attended in all, so the tail stops at the last filled
    one. Returns (b, 1, q_heads, d). The chosen rows are found inside the attention kernel, never listed or copied.
    """
    ranked = _rank(query, centroids, order, offsets, sinks, room, tail_start)
    return decode_kernel.launch(query, key, value, lengths, scaling, ranked)


@cluster_attention.register_fake
def _(query, key, value, centroids, order, offsets, lengths, sinks, room, tail_start, scaling):
    b, q_heads, _, d = query.shape
    return query.new_empty(b, 1, q_heads, d)


def _rank(query, centroids, order, offsets, sinks: int, room: int, tail_start: int) -> decode_kernel.Ranked:
    """One program per (sequence, KV head) scores and ranks the clusters and lays out their members."""
    b, q_heads, _, d = query.shape
    kv_heads, n_clusters = centroids.shape[1], centroids.shape[2]
    # At least 16 slots: with 0 or 1 cluster the sort and scan of a 1-element tile failed to build on the GPU.
    c_pad = max(16, triton.next_power_of_2(n_clusters))
    if c_pad > 1 << 16:
        raise ValueError(f"ClusterKV's kernels take up to 65536 clusters, got {n_clusters}")
    if room > order.shape[-1]:
        raise ValueError(f"room {room} exceeds the {order.shape[-1]} clustered tokens")
    ends = torch.empty(b * kv_heads, c_pad, dtype=torch.int32, device=query.device)
    shift = torch.empty(b * kv_heads, c_pad, dtype=torch.long, device=query.device)
    group = q_heads // kv_heads
    _rank_kernel[(b * kv_heads,)](
        query, centroids, offsets, ends, shift,
        query.stride(0), query.stride(1), *centroids.stride()[:3], *offsets.stride()[:2], n_clusters,
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d, C_PAD=c_pad,
        BLOCK_C=RANK_BLOCK_C, num_warps=RANK_WARPS,
    )  # fmt: skip
    return decode_kernel.Ranked(order, ends, shift, sinks, room, tail_start)


if triton is not None:

    @triton.jit
    def _nearest_kernel(
        KEYS, CENTROIDS, BEST, INDEX, n, n_clusters, stride_kr, stride_kn, stride_cr, stride_cc,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        tokens = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, D)
        keys = tl.load(KEYS + row * stride_kr + tokens[:, None] * stride_kn + dims[None, :], mask=tokens[:, None] < n, other=0.0)
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        index = tl.zeros([BLOCK_N], tl.int32)
        for c0 in range(0, n_clusters, BLOCK_C):
            clusters = c0 + tl.arange(0, BLOCK_C)
            c = tl.load(CENTROIDS + row * stride_cr + clusters[:, None] * stride_cc + dims[None, :],
                        mask=clusters[:, None] < n_clusters, other=0.0)  # fmt: skip
            sims = tl.where(clusters[None, :] < n_clusters, tl.dot(keys, tl.trans(c)), float("-inf"))
            top = tl.max(sims, 1)
            better = top > best  # strict: ties keep the lower index, as argmax does
            index = tl.where(better, tl.argmax(sims, 1) + c0, index)
            best = tl.where(better, top, best)
        norm = tl.sqrt(tl.sum(keys.to(tl.float32) * keys.to(tl.float32), 1))
        tl.store(BEST + row * n + tokens, best / tl.maximum(norm, 1e-12), mask=tokens < n)
        tl.store(INDEX + row * n + tokens, index.to(tl.int64), mask=tokens < n)

    @triton.jit
    def _orderable(x):
        """float32 -> int64 whose signed order is the floats' order."""
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)

    @triton.jit
    def _rank_kernel(
        Q, CENTROIDS, OFFSETS, ENDS, SHIFT,
        stride_qb, stride_qh, stride_cb, stride_ch, stride_cc, stride_fb, stride_fh, n_clusters,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
        C_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Score the clusters against the summed group query, rank them best first (ties: lower index
        first), and lay their members end to end: ranked cluster r fills slots [ends[r] - size, ends[r])."""
        pid = tl.program_id(0)
        b = pid // KV_HEADS
        h = pid % KV_HEADS
        dims = tl.arange(0, D)
        q = tl.sum(load_group_query(Q + b * stride_qb, h, stride_qh, GROUP, GROUP_PAD, D).to(tl.float32), 0)
        ends_at = ENDS + pid * C_PAD
        shift_at = SHIFT + pid * C_PAD
        scores_at = (shift_at).to(tl.pointer_type(tl.float32))  # scratch: SHIFT is written only after the sort
        centroids = CENTROIDS + b * stride_cb + h * stride_ch
        for c0 in range(0, n_clusters, BLOCK_C):
            rows = c0 + tl.arange(0, BLOCK_C)
            c = tl.load(centroids + rows[:, None] * stride_cc + dims[None, :], mask=rows[:, None] < n_clusters, other=0.0)
            tl.store(scores_at + rows, tl.sum(c.to(tl.float32) * q[None, :], 1), mask=rows < n_clusters)
        tl.debug_barrier()  # the scores were written by other threads than the ones reading them back
        ids = tl.arange(0, C_PAD)
        scores = tl.load(scores_at + ids, mask=ids < n_clusters, other=float("-inf"))
        tl.debug_barrier()
        packed = (_orderable(scores) << 16) | (C_PAD - 1 - ids).to(tl.int64)
        ranked = (C_PAD - 1 - (tl.sort(packed, descending=True) & (C_PAD - 1))).to(tl.int32)
        real = ranked < n_clusters
        offsets = OFFSETS + b * stride_fb + h * stride_fh
        starts = tl.load(offsets + ranked, mask=real, other=0)
        sizes = tl.load(offsets + ranked + 1, mask=real, other=0) - starts
        ends = tl.cumsum(sizes, 0)
        tl.store(ends_at + ids, ends.to(tl.int32))
        tl.store(shift_at + ids, starts - (ends - sizes))  # slot j of ranked cluster r reads order[shift[r] + j]

    @triton.jit
    def _fill_kernel(
        ORDER, ENDS, SHIFT, OUT, stride_ob, stride_oh, stride_outb, stride_outh, sinks, room,
        KV_HEADS: tl.constexpr, C_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """BLOCK_M output slots of one (sequence, KV head), sinks then chosen members (`decode_kernel.Ranked`)."""
        pid = tl.program_id(0)
        b = pid // KV_HEADS
        h = pid % KV_HEADS
        slots = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = ranked_rows(slots, ORDER + b * stride_ob + h * stride_oh, ENDS + pid * C_PAD, SHIFT + pid * C_PAD,
                           sinks, room, 0, C_PAD)  # fmt: skip
        tl.store(OUT + b * stride_outb + h * stride_outh + slots, rows, mask=slots < sinks + room)
