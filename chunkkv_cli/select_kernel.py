"""ClusterKV's per-step token selection as one Triton kernel per layer.

In PyTorch, choosing the best clusters and listing their members takes about twenty small kernels
per layer (scores, argsort, cumulative sizes, searchsorted, several gathers, concatenation); in a
32-layer decode step those launches cost more than reading the selected tokens. Here one program
per (sequence, KV head) scores the centroids against the summed group query, then repeatedly takes
the best remaining cluster and copies its members until the budget is full. Typically 10-20
clusters fill a 1k budget, so the loop is short.
"""

from __future__ import annotations

import torch

from chunkkv_cli.decode_kernel import available, triton

__all__ = ["available", "select_clusters"]

if triton is not None:
    import triton.language as tl

BLOCK_C = 32  # centroids scored per load
BLOCK_M = 128  # member positions copied per load


@torch.library.custom_op("chunkkv::select_clusters", mutates_args=())
def select_clusters(
    query: torch.Tensor, centroids: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, sinks: int, room: int
) -> torch.Tensor:
    """Positions to attend: the `sinks` first tokens, then members of the best clusters, cut to `room`.

    query (b, q_heads, 1, d); centroids (b, kv_heads, C, d); order/offsets: the clusters' members in
    CSR form (see `clusterkv.members`), which must hold at least `room` tokens. Returns int64
    (b, kv_heads, sinks + room), the same positions as `clusterkv.select_tokens` after the sinks.
    """
    b, q_heads, _, d = query.shape
    kv_heads, n_clusters = centroids.shape[1], centroids.shape[2]
    group = q_heads // kv_heads
    out = torch.empty(b, kv_heads, sinks + room, dtype=torch.long, device=query.device)
    c_pad = triton.next_power_of_2(n_clusters)
    scores = torch.empty(b * kv_heads, c_pad, dtype=torch.float32, device=query.device)
    _select[(b * kv_heads,)](
        query, centroids, order, offsets, scores, out,
        query.stride(0), query.stride(1), *centroids.stride()[:3], *order.stride()[:2], *offsets.stride()[:2],
        *out.stride()[:2], n_clusters, sinks, room,
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d, C_PAD=c_pad,
        BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M,
    )  # fmt: skip
    return out


@select_clusters.register_fake
def _(query, centroids, order, offsets, sinks, room):
    return query.new_empty(query.shape[0], centroids.shape[1], sinks + room, dtype=torch.long)


if triton is not None:

    @triton.jit
    def _select(
        Q, CENTROIDS, ORDER, OFFSETS, SCORES, OUT,
        stride_qb, stride_qh, stride_cb, stride_ch, stride_cc, stride_ob, stride_oh, stride_fb, stride_fh,
        stride_outb, stride_outh, n_clusters, sinks, room,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
        C_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = pid // KV_HEADS
        h = pid % KV_HEADS
        dims = tl.arange(0, D)
        heads = tl.arange(0, GROUP_PAD)
        q = tl.load(
            Q + b * stride_qb + (h * GROUP + heads)[:, None] * stride_qh + dims[None, :],
            mask=heads[:, None] < GROUP, other=0.0,
        )  # fmt: skip
        q = tl.sum(q.to(tl.float32), 0)
        centroids = CENTROIDS + b * stride_cb + h * stride_ch
        for c0 in range(0, n_clusters, BLOCK_C):
            rows = c0 + tl.arange(0, BLOCK_C)
            c = tl.load(centroids + rows[:, None] * stride_cc + dims[None, :], mask=rows[:, None] < n_clusters, other=0.0)
            tl.store(SCORES + pid * C_PAD + rows, tl.sum(c.to(tl.float32) * q[None, :], 1), mask=rows < n_clusters)
        tl.debug_barrier()  # the scores were written by different threads than the ones reading them back
        clusters = tl.arange(0, C_PAD)
        scores = tl.load(SCORES + pid * C_PAD + clusters, mask=clusters < n_clusters, other=float("-inf"))

        out = OUT + b * stride_outb + h * stride_outh
        for s0 in range(0, sinks, BLOCK_M):
            slots = s0 + tl.arange(0, BLOCK_M)
            tl.store(out + slots, slots.to(tl.int64), mask=slots < sinks)
        out += sinks
        order = ORDER + b * stride_ob + h * stride_oh
        offsets = OFFSETS + b * stride_fb + h * stride_fh
        filled = pid * 0
        taken = pid * 0
        while (filled < room) & (taken < n_clusters):
            best = tl.argmax(scores, 0)
            start = tl.load(offsets + best).to(tl.int32)
            size = tl.load(offsets + best + 1).to(tl.int32) - start
            take = tl.minimum(size, room - filled)
            for m0 in range(0, take, BLOCK_M):
                m = m0 + tl.arange(0, BLOCK_M)
                members = tl.load(order + start + m, mask=m < take)
                tl.store(out + filled + m, members, mask=m < take)
            filled += take
            taken += 1
            scores = tl.where(clusters == best, float("-inf"), scores)
