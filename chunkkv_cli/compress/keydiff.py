from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from chunkkv_cli.compress.base import Capabilities, Compressor, keep_top


def key_diversity(key: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity of every key to its head's mean (unit-normalised) key.

    key: (batch, kv_heads, kv_len, head_dim) -> (batch, kv_heads, kv_len) in fp32; higher = more distinctive.
    """
    unit = F.normalize(key.float(), dim=-1)
    anchor = F.normalize(unit.mean(dim=2, keepdim=True), dim=-1)
    return -(unit * anchor).sum(dim=-1)


@dataclass
class KeyDiff(Compressor):
    """Per KV head, keep the prefix tokens whose keys differ most from the mean key, plus the window.

    Based on Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference
    in Resource-Constrained Environments" (https://arxiv.org/abs/2504.15364). Scores read the keys only,
    no query and no attention weights: a document is scored the same with or without its question, and
    the scores need no attention matrix (they fit kernels that never materialise one).

    Parameters
    ----------
    ratio, budget, window
        As for every method (`Compressor`).
    """

    name: ClassVar[str] = "keydiff"
    caps: ClassVar[Capabilities] = Capabilities(prefill_select=True, per_head=True, question_agnostic=True)
    graphable: ClassVar[bool] = True

    def select_tokens(self, query, key, n_kept, window, scaling):
        kv_len = key.shape[2]
        return keep_top(key_diversity(key)[..., : kv_len - window], n_kept, window)
