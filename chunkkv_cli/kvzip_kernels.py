"""The reconstruction pass on a GPU: flash attention with its log-sum-exp, and one Triton kernel for the scores.

A repeat piece of n queries attends to the document (no mask) and to itself (causal). Both parts run through
PyTorch's flash attention, which also returns each query's log-sum-exp; merging the two gives the exact output
and the full softmax denominator. The document part folds the query heads of a KV group into the query rows,
so the document's keys are never repeated per query head. A token's score, the largest weight any repeat
query gives it, is then max_q exp(q.k * scale - lse_q): one pass over the queries per block of document keys,
without the n x doc_len matrix.
"""

from __future__ import annotations

import torch

from chunkkv_cli import decode_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch come without Triton
    triton = None

BLOCK_KEYS = 128
BLOCK_ROWS = 64


def available(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    return decode_kernel.available(device, head_dim) and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256


def _flash(query, key, value, causal: bool, scale: float):
    """(output, lse) of flash attention; query/key/value (b, heads, n, d) with as many heads each."""
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def attend(query, doc_k, doc_v, own_k, own_v, scale: float):
    """Causal attention of a repeat piece over the document (no mask) and itself (causal), never concatenated.

    query (b, q_heads, n, d); doc_k/doc_v (b, kv_heads, doc_len, d); own_k/own_v (b, kv_heads, n, d), the
    piece's own. Returns the output (b, n, q_heads, d) and
    each query's log-sum-exp over the piece alone and over all it attends to, both (b, kv_heads, group * n) fp32,
    rows ordered as the folded queries (query head within its group, then position).
    """
    b, q_heads, n, d = query.shape
    kv_heads = doc_k.shape[1]
    group = q_heads // kv_heads
    folded = query.reshape(b, kv_heads, group * n, d)
    doc_out, doc_lse = _flash(folded, doc_k, doc_v, False, scale)
    own_k, own_v = (t.repeat_interleave(group, dim=1) for t in (own_k, own_v))
    own_out, own_lse = _flash(query, own_k, own_v, True, scale)
    own_lse = own_lse.reshape(b, kv_heads, group * n)
    lse = torch.logaddexp(doc_lse, own_lse)
    weight_doc = torch.exp(doc_lse - lse)[..., None]
    merged = doc_out.float() * weight_doc + own_out.reshape(b, kv_heads, group * n, d).float() * (1 - weight_doc)
    return merged.to(query.dtype).reshape(b, q_heads, n, d).transpose(1, 2).contiguous(), own_lse, lse


def local_scores(query, doc_k, own_lse, span: tuple[int, int], sinks: int, scale: float) -> torch.Tensor:
    """KVzip's scores of the stretch [start, end): softmax over the sinks, the stretch and the piece (whose
    log-sum-exp `own_lse` the attention already has). Returns (b, kv_heads, end - start) fp32."""
    start, end = span
    b, q_heads, n, d = query.shape
    kv_heads = doc_k.shape[1]
    folded = query.reshape(b, kv_heads, q_heads // kv_heads * n, d)
    visible = torch.cat([doc_k[:, :, : min(sinks, start)], doc_k[:, :, start:end]], dim=2)
    _, stretch_lse = _flash(folded, visible, visible, False, scale)
    return best_weights(folded, doc_k[:, :, start:end], torch.logaddexp(stretch_lse, own_lse), scale)


def best_weights(folded: torch.Tensor, doc_keys: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """max over rows of exp(q.k * scale - lse): folded (b, kv_heads, rows, d), doc_keys (b, kv_heads, L, d),
    lse (b, kv_heads, rows) fp32. Returns (b, kv_heads, L) fp32."""
    b, kv_heads, rows, d = folded.shape
    doc_len = doc_keys.shape[2]
    out = torch.empty(b, kv_heads, doc_len, device=folded.device, dtype=torch.float32)
    lse = lse.contiguous()
    grid = (triton.cdiv(doc_len, BLOCK_KEYS), b * kv_heads)
    _best_weights[grid](
        folded, doc_keys, lse, out,
        folded.stride(0), folded.stride(1), folded.stride(2), doc_keys.stride(0), doc_keys.stride(1), doc_keys.stride(2),
        rows, doc_len, scale,
        KV_HEADS=kv_heads, D=d, BLOCK_KEYS=BLOCK_KEYS, BLOCK_ROWS=BLOCK_ROWS,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _best_weights(
        Q, K, LSE, OUT,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        rows, doc_len, scale,
        KV_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):
        block = tl.program_id(0)
        seq_head = tl.program_id(1)
        b = seq_head // KV_HEADS
        h = seq_head % KV_HEADS
        dims = tl.arange(0, D)
        cols = block * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
        k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + dims[None, :],
                    mask=cols[:, None] < doc_len, other=0.0)  # fmt: skip
        # exp is monotonic: the best log-weight per key is kept and exponentiated once at the end.
        best = tl.full([BLOCK_KEYS], float("-inf"), tl.float32)
        q_base = Q + b * stride_qb + h * stride_qh
        for r0 in range(0, rows, BLOCK_ROWS):
            r = r0 + tl.arange(0, BLOCK_ROWS)
            q = tl.load(q_base + r[:, None] * stride_qn + dims[None, :], mask=r[:, None] < rows, other=0.0)
            lse = tl.load(LSE + seq_head * rows + r, mask=r < rows, other=float("inf"))
            best = tl.maximum(best, tl.max(tl.dot(q, tl.trans(k)) * scale - lse[:, None], 0))
        tl.store(OUT + seq_head * doc_len + cols, tl.exp(best), mask=cols < doc_len)
