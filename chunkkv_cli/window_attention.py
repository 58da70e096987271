"""Attention as the model defines it where plain causal SDPA is not: sliding windows, soft-capped logits, sinks.

Gemma 2 caps its logits (tanh), GPT-OSS adds a learned sink logit per head, and their sliding layers attend
to the last `window` positions only. transformers' SDPA path supports neither cap nor sinks, so these run
here, in blocks of queries, each over the keys it can see (the causal and window bounds), so memory stays
at one block's scores and a sliding layer costs its window, not the whole prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORE_BYTES = 2**29  # one block's fp32 logits


def block_mask(rows: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """rows (r,), keys (k,) absolute positions -> (r, k) True where attending is allowed."""
    mask = keys[None, :] <= rows[:, None]
    if window:
        mask &= keys[None, :] > rows[:, None] - window
    return mask


def needs_own_attention(window, softcap, sinks, q_len: int, kv_len: int) -> bool:
    """True when the layer's attention cannot be plain SDPA with a bottom-right causal mask."""
    return softcap is not None or sinks is not None or (bool(window) and q_len > 1 and kv_len > window)


def windowed_attention(query, key, value, scaling: float, window=None, softcap=None, sinks=None):
    """query (b, q_heads, q_len, d) over key/value (b, kv_heads, kv_len, d), the queries being the last q_len
    positions. Returns (b, q_len, q_heads, d) like transformers' attention functions."""
    b, q_heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    if softcap is None and sinks is None:  # SDPA holds no logits on the GPU: blocks as long as the window
        block = min(q_len, max(window, 1024))
    else:
        block = max(1, min(q_len, SCORE_BYTES // (4 * b * q_heads * min(kv_len, (window or kv_len) + q_len))))
    out = query.new_empty(b, q_len, q_heads, value.shape[-1])
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        first_row, last_row = kv_len - q_len + start, kv_len - q_len + stop - 1
        lo = max(0, first_row - window + 1) if window else 0
        rows = torch.arange(first_row, last_row + 1, device=query.device)
        mask = block_mask(rows, torch.arange(lo, last_row + 1, device=query.device), window)
        q, k, v = query[:, :, start:stop], key[:, :, lo : last_row + 1], value[:, :, lo : last_row + 1]
        if softcap is None and sinks is None:  # K/V repeated per query head: CUDA's masked kernel does not group them
            groups = q_heads // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            part = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        else:
            part = eager_block(q, k, v, mask, scaling, softcap, sinks)
        out[:, start:stop] = part.transpose(1, 2)
    return out


def eager_block(query, key, value, mask, scaling: float, softcap=None, sinks=None):
    """softmax(cap(q.k * scaling) | sink) . v in fp32 for one block; (b, q_heads, rows, d)."""
    b, q_heads, rows, d = query.shape
    kv_heads = key.shape[1]
    q = query.view(b, kv_heads, q_heads // kv_heads, rows, d)
    logits = torch.einsum("bkgrd,bksd->bkgrs", q.float(), key.float()) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, kv_heads, -1, 1, 1).expand(b, -1, -1, rows, 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
    else:
        probs = logits.softmax(dim=-1)
    out = torch.einsum("bkgrs,bksd->bkgrd", probs, value.float())
    return out.reshape(b, q_heads, rows, value.shape[-1]).to(value.dtype)
