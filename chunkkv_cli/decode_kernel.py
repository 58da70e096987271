"""Split-KV decode attention in Triton (flash-decoding) for the fast decoder's static buffers.

One new query per sequence attends to the first `length` slots of a (batch, kv_heads, capacity, d)
buffer. SDPA cannot do this well: with a slot mask it runs one thread block per (sequence, KV
head) that walks the whole buffer alone, 8 blocks on a 132-SM GPU at batch 1. Here the buffer is
cut into splits that run in parallel, each keeping a running max and sum (online softmax), and a
second kernel merges the splits. The query heads of a KV group are the rows of one tile, so keys
and values are read once per group, never repeated. In the ranked mode (`Ranked`, ClusterKV) each slot's
buffer row is looked up inside the kernel, so the chosen tokens are read in place, never gathered.
"""

from __future__ import annotations

import os

from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch come without Triton
    triton = None

BLOCK_N = 64
TARGET_PROGRAMS = 256  # enough thread blocks to occupy every SM a few times over
NUM_WARPS = 4
# A ranked launch (ClusterKV) reads rows through a lookup, dependent loads the compiler cannot pipeline: more,
# smaller programs hide that latency (benchmarks/decode_kernel_sweep.py, H200: best of 512-2048 programs, 2-4 warps).
RANKED_TARGET_PROGRAMS = 1024
RANKED_WARPS = 2


class Ranked(NamedTuple):
    """Slots laid out as ClusterKV attends them: `sinks` first positions, `room` members of ranked clusters end to
    end, then the buffer from `tail_start` on. Member j lies in the ranked cluster r with ends[r - 1] <= j < ends[r]
    and sits at position order[shift[r] + j]. ends/shift: (batch * kv_heads, c_pad); order: (batch, kv_heads, n)."""

    order: torch.Tensor
    ends: torch.Tensor
    shift: torch.Tensor
    sinks: int
    room: int
    tail_start: int


def available(device: torch.device, head_dim: int) -> bool:
    """Triton present, a CUDA tensor, a power-of-two head size (tile shape), and not switched off."""
    power_of_two = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    return triton is not None and device.type == "cuda" and power_of_two and not os.environ.get("CHUNKKV_NO_TRITON")


def split_plan(capacity: int, batch_heads: int, target: int | None = None) -> tuple[int, int]:
    """(splits, tokens per split): about `target` programs to fill the GPU, each split a whole number of blocks."""
    blocks = triton.cdiv(capacity, BLOCK_N)
    splits = max(1, min(blocks, (target or TARGET_PROGRAMS) // max(batch_heads, 1)))
    chunk = triton.cdiv(blocks, splits) * BLOCK_N
    return triton.cdiv(capacity, chunk), chunk


@torch.library.custom_op("chunkkv::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, scaling: float
) -> torch.Tensor:
    """query (b, q_heads, 1, d); key/value (b, kv_heads, capacity, d); lengths (b,) int: filled slots.

    Returns (b, 1, q_heads, d), the layout transformers' attention functions return. A custom op,
    so torch.compile treats it as one opaque call.
    """
    return launch(query, key, value, lengths, scaling)


@decode_attention.register_fake
def _(query, key, value, lengths, scaling):
    return _fake_output(query)


def write_slot(key_states, value_states, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor) -> None:
    """Write one new token's K and V (b, kv_heads, 1, d) at position `slot` (a 0-d tensor) of the buffers.

    One launch for both on the GPU, where two `index_copy_` launches per layer cost more than the bytes they move.
    """
    b, heads, _, d = keys.shape
    if not available(keys.device, d) or any(t.stride(-1) != 1 for t in (key_states, value_states, keys, values)):
        keys.index_copy_(2, slot.view(1), key_states)
        values.index_copy_(2, slot.view(1), value_states)
        return
    _write_slot[(b * heads,)](
        key_states, value_states, keys, values, slot, *key_states.stride()[:2], *value_states.stride()[:2],
        *keys.stride()[:3], *values.stride()[:3], HEADS=heads, D=d,
    )  # fmt: skip


def _fake_output(query: torch.Tensor) -> torch.Tensor:
    b, q_heads, _, d = query.shape
    return query.new_empty(b, 1, q_heads, d)


def launch(query, key, value, lengths, scaling: float, ranked: Ranked | None = None) -> torch.Tensor:
    """Split-KV attention over the first `lengths` slots of the buffers, laid out by `ranked` where given."""
    b, q_heads, _, d = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    if ranked is None:
        target, warps, slots = TARGET_PROGRAMS, NUM_WARPS, capacity
        order, ends, shift, sinks, room, tail_start = key, lengths, lengths, 0, 0, 0  # unread without RANKED
    else:
        target, warps = RANKED_TARGET_PROGRAMS, RANKED_WARPS
        order, ends, shift, sinks, room, tail_start = ranked
        slots = sinks + room + capacity - tail_start
    splits, chunk = split_plan(slots, b * kv_heads, target)
    partial = torch.empty(b * kv_heads * splits, group_pad, d, device=query.device, dtype=torch.float32)
    stats = torch.empty(b * kv_heads * splits, group_pad, 2, device=query.device, dtype=torch.float32)
    c_pad = ends.shape[-1] if ranked is not None else 1
    _split_attention[(b * kv_heads, splits)](
        query, key, value, lengths, order, ends, shift, partial, stats,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), order.stride(0), order.stride(1),
        sinks, room, tail_start, scaling,
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=group_pad, D=d, BLOCK_N=BLOCK_N, CHUNK=chunk, SPLITS=splits,
        RANKED=ranked is not None, C_PAD=c_pad, num_warps=warps,
    )  # fmt: skip
    out = torch.empty(b, 1, q_heads, d, device=query.device, dtype=query.dtype)
    _merge_splits[(b * kv_heads, group)](
        partial, stats, out, GROUP=group, GROUP_PAD=group_pad, D=d, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits)
    )
    return out


if triton is not None:

    @triton.jit
    def load_group_query(q_seq, kv_head, stride_qh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr):
        """The query heads reading one KV head, as the rows of a (GROUP_PAD, D) tile (padding rows zero)."""
        rows = tl.arange(0, GROUP_PAD)
        return tl.load(
            q_seq + (kv_head * GROUP + rows)[:, None] * stride_qh + tl.arange(0, D)[None, :],
            mask=rows[:, None] < GROUP, other=0.0,
        )

    @triton.jit
    def attend_block(q, k, v, inside, scaling, best, total, acc):
        """One block of keys and values folded into a split's running max, sum and weighted values (online softmax)."""
        scores = tl.dot(q, tl.trans(k)) * scaling
        scores = tl.where(inside[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        rescale = tl.exp(best - new_best)
        p = tl.exp(scores - new_best[:, None])
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        total = total * rescale + tl.sum(p, 1)
        return new_best, total, acc

    @triton.jit
    def store_split(PARTIAL, STATS, program, acc, best, total, GROUP_PAD: tl.constexpr, D: tl.constexpr):
        """A split's partial output and (max, sum), for `_merge_splits`; `program`: (sequence-head) * SPLITS + split."""
        slot = program * GROUP_PAD + tl.arange(0, GROUP_PAD)
        tl.store(PARTIAL + slot[:, None] * D + tl.arange(0, D)[None, :], acc)
        tl.store(STATS + slot * 2, best)
        tl.store(STATS + slot * 2 + 1, total)

    @triton.jit
    def ranked_rows(cols, ORDER, ENDS, SHIFT, sinks, room, tail_start, C_PAD: tl.constexpr):
        """Buffer rows of slots `cols` laid out as `Ranked` says; ENDS/SHIFT/ORDER point at one (sequence, KV head)."""
        j = cols - sinks
        chosen = (j >= 0) & (j < room)
        rank = tl.zeros_like(cols)  # searchsorted(ends, j, right=True): a binary search, each step a gather from L1
        step = C_PAD // 2
        while step > 0:
            rank = tl.where(tl.load(ENDS + rank + step - 1) <= j, rank + step, rank)
            step = step // 2
        source = tl.load(SHIFT + rank, mask=chosen, other=0) + j
        member = tl.load(ORDER + source, mask=chosen, other=0)
        return tl.where(j < 0, cols, tl.where(chosen, member, j - room + tail_start))

    @triton.jit
    def _split_attention(
        Q, K, V, LENGTHS, ORDER, ENDS, SHIFT, PARTIAL, STATS,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh,
        sinks, room, tail_start, scaling,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr, RANKED: tl.constexpr,
        C_PAD: tl.constexpr,
    ):  # fmt: skip
        seq_head = tl.program_id(0)
        split = tl.program_id(1)
        b = seq_head // KV_HEADS
        h = seq_head % KV_HEADS
        dims = tl.arange(0, D)
        q = load_group_query(Q + b * stride_qb, h, stride_qh, GROUP, GROUP_PAD, D)
        length = tl.load(LENGTHS + b)
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, length)
        best = tl.full([GROUP_PAD], -1.0e30, tl.float32)  # finite, so an empty split gives weight 0, not NaN
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            inside = cols < end
            if RANKED:
                rows_at = ranked_rows(cols, ORDER + b * stride_ob + h * stride_oh, ENDS + seq_head * C_PAD,
                                      SHIFT + seq_head * C_PAD, sinks, room, tail_start, C_PAD)  # fmt: skip
            else:
                rows_at = cols
            k = tl.load(k_base + rows_at[:, None] * stride_kn + dims[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(v_base + rows_at[:, None] * stride_vn + dims[None, :], mask=inside[:, None], other=0.0)
            best, total, acc = attend_block(q, k, v, inside, scaling, best, total, acc)
        store_split(PARTIAL, STATS, seq_head * SPLITS + split, acc, best, total, GROUP_PAD, D)

    @triton.jit
    def _write_slot(
        K_NEW, V_NEW, K, V, SLOT, stride_knb, stride_knh, stride_vnb, stride_vnh,
        stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, HEADS: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0) // HEADS
        h = tl.program_id(0) % HEADS
        slot = tl.load(SLOT)
        dims = tl.arange(0, D)
        k = tl.load(K_NEW + b * stride_knb + h * stride_knh + dims)
        tl.store(K + b * stride_kb + h * stride_kh + slot * stride_kn + dims, k)
        v = tl.load(V_NEW + b * stride_vnb + h * stride_vnh + dims)
        tl.store(V + b * stride_vb + h * stride_vh + slot * stride_vn + dims, v)

    @triton.jit
    def _merge_splits(
        PARTIAL, STATS, OUT,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    ):
        seq_head = tl.program_id(0)
        row = tl.program_id(1)
        splits = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, D)
        used = splits < SPLITS
        slot = (seq_head * SPLITS + splits) * GROUP_PAD + row
        best = tl.load(STATS + slot * 2, mask=used, other=-1.0e30)
        weight = tl.exp(best - tl.max(best, 0))
        total = tl.sum(weight * tl.load(STATS + slot * 2 + 1, mask=used, other=0.0), 0)
        partial = tl.load(PARTIAL + slot[:, None] * D + dims[None, :], mask=used[:, None], other=0.0)
        out = tl.sum(partial * weight[:, None], 0) / total
        tl.store(OUT + (seq_head * GROUP + row) * D + dims, out.to(OUT.dtype.element_ty))
