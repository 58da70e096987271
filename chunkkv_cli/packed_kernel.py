"""Split-KV decode attention over packed per-head prefixes and a dense tail, in Triton (see `packed.py`).

KV head h attends to its own `offsets[h + 1] - offsets[h]` packed prefix rows, then to the first
`tail_len` slots of its row of the tail buffer: one virtual sequence per head, of a head's own length.
Each head's sequence is cut into splits that run in parallel (online softmax per split, then a merge by
log-sum-exp), as flash-decoding does; splits past a shorter head's end do nothing. The query heads of a
KV group are the rows of one tile, so every kept key and value is read once per step.
"""

from __future__ import annotations

import torch

from chunkkv_cli.decode_kernel import BLOCK_N, split_plan

try:
    import triton
    import triton.language as tl

    from chunkkv_cli.decode_kernel import _merge_splits, attend_block, load_group_query, store_split
except ImportError:  # CPU wheels of torch come without Triton
    triton = None


@torch.library.custom_op("chunkkv::packed_decode_attention", mutates_args=())
def packed_decode_attention(
    query: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, offsets: torch.Tensor,
    tail_keys: torch.Tensor, tail_values: torch.Tensor, tail_len: torch.Tensor, scaling: float, longest_prefix: int,
) -> torch.Tensor:
    """query (1, q_heads, 1, d); prefix_keys/values (total, d) with offsets (kv_heads + 1,) int32;
    tail_keys/values (1, kv_heads, capacity, d) of which the first tail_len (1,) int32 slots are filled;
    longest_prefix: the longest head's prefix (sizes the splits, fixed for a CUDA graph).
    Returns (1, 1, q_heads, d), the layout transformers' attention functions return.
    """
    _, q_heads, _, d = query.shape
    kv_heads = tail_keys.shape[1]
    group = q_heads // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    splits, chunk = split_plan(longest_prefix + tail_keys.shape[2], kv_heads)
    partial = torch.empty(kv_heads * splits, group_pad, d, device=query.device, dtype=torch.float32)
    stats = torch.empty(kv_heads * splits, group_pad, 2, device=query.device, dtype=torch.float32)
    _packed_splits[(kv_heads, splits)](
        query, prefix_keys, prefix_values, offsets, tail_keys, tail_values, tail_len, partial, stats,
        query.stride(1), prefix_keys.stride(0), prefix_values.stride(0),
        tail_keys.stride(1), tail_keys.stride(2), tail_values.stride(1), tail_values.stride(2), scaling,
        GROUP=group, GROUP_PAD=group_pad, D=d, BLOCK_N=BLOCK_N, CHUNK=chunk, SPLITS=splits,
    )  # fmt: skip
    out = torch.empty(1, 1, q_heads, d, device=query.device, dtype=query.dtype)
    _merge_splits[(kv_heads, group)](
        partial, stats, out, GROUP=group, GROUP_PAD=group_pad, D=d, SPLITS=splits,
        SPLITS_PAD=triton.next_power_of_2(splits),
    )  # fmt: skip
    return out


@packed_decode_attention.register_fake
def _(query, prefix_keys, prefix_values, offsets, tail_keys, tail_values, tail_len, scaling, longest_prefix):
    _, q_heads, _, d = query.shape
    return query.new_empty(1, 1, q_heads, d)


if triton is not None:

    @triton.jit
    def _packed_splits(
        Q, PK, PV, OFFSETS, TK, TV, TAIL_LEN, PARTIAL, STATS,
        stride_qh, stride_pk, stride_pv, stride_tkh, stride_tkn, stride_tvh, stride_tvn, scaling,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        CHUNK: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        h = tl.program_id(0)
        split = tl.program_id(1)
        dims = tl.arange(0, D)
        q = load_group_query(Q, h, stride_qh, GROUP, GROUP_PAD, D)
        first = tl.load(OFFSETS + h)
        n_prefix = tl.load(OFFSETS + h + 1) - first
        length = n_prefix + tl.load(TAIL_LEN)
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, length)
        best = tl.full([GROUP_PAD], -1.0e30, tl.float32)  # finite: an empty split weighs 0 in the merge, not NaN
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            inside = cols < end
            in_prefix = (cols < n_prefix)[:, None]
            in_tail = (inside & (cols >= n_prefix))[:, None]
            tail_row = (cols - n_prefix)[:, None]
            k = tl.load(PK + (first + cols)[:, None] * stride_pk + dims[None, :], mask=in_prefix & inside[:, None], other=0.0)
            k += tl.load(TK + h * stride_tkh + tail_row * stride_tkn + dims[None, :], mask=in_tail, other=0.0)
            v = tl.load(PV + (first + cols)[:, None] * stride_pv + dims[None, :], mask=in_prefix & inside[:, None], other=0.0)
            v += tl.load(TV + h * stride_tvh + tail_row * stride_tvn + dims[None, :], mask=in_tail, other=0.0)
            best, total, acc = attend_block(q, k, v, inside, scaling, best, total, acc)
        store_split(PARTIAL, STATS, h * SPLITS + split, acc, best, total, GROUP_PAD, D)
