from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from chunkkv_cli.compress.base import Capabilities, Compressor, keep_top, window_scores


@dataclass
class SnapKV(Compressor):
    """Per KV head, keep the prefix tokens the observation window attends to most, plus the window.

    Based on Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation"
    (https://arxiv.org/abs/2404.14469).

    Parameters
    ----------
    pool_kernel : int, default 7
        Width of the average pool that smooths scores along the sequence.
    """

    pool_kernel: int = 7

    name: ClassVar[str] = "snapkv"
    caps: ClassVar[Capabilities] = Capabilities(prefill_select=True, window_queries=True, per_head=True)
    graphable: ClassVar[bool] = True

    def select_tokens(self, query, key, n_kept, window, scaling):
        scores = window_scores(query, key, window, scaling, self.pool_kernel)
        return keep_top(scores, n_kept, window)
