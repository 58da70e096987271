from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from chunkkv_cli.compress.base import Capabilities, Compressor, group_queries, keep_top


def accumulated_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, block: int) -> torch.Tensor:
    """Attention each key receives, summed over every (causal) query, per KV head.

    Computed `block` queries at a time so the full kv_len x kv_len matrix never exists.
    Returns (batch, kv_heads, kv_len) in fp32.
    """
    b, kv_heads, kv_len, _ = key.shape
    q = group_queries(query, kv_heads)
    keys_t = key.unsqueeze(2).transpose(-1, -2)
    total = torch.zeros(b, kv_heads, kv_len, device=key.device, dtype=torch.float32)
    positions = torch.arange(kv_len, device=key.device)
    for start in range(0, kv_len, block):
        end = min(start + block, kv_len)
        logits = torch.matmul(q[:, :, :, start:end], keys_t[..., :end]).float() * scaling
        future = positions[None, :end] > positions[start:end, None]
        probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
        total[..., :end] += probs.sum(dim=(2, 3))
    return total


@dataclass
class H2O(Compressor):
    """Heavy hitters: keep the tokens that received the most attention from the whole prompt, plus the recent window.

    Based on Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models" (https://arxiv.org/abs/2306.14048), in the prefill setting.

    Parameters
    ----------
    block : int, default 512
        Queries per block when accumulating attention (memory vs. speed).
    """

    block: int = 512

    name: ClassVar[str] = "h2o"
    caps: ClassVar[Capabilities] = Capabilities(prefill_select=True, per_head=True)

    def select_tokens(self, query, key, n_kept, window, scaling):
        kv_len = key.shape[2]
        scores = accumulated_attention(query, key, scaling, self.block)[..., : kv_len - window]
        return keep_top(scores, n_kept, window)
