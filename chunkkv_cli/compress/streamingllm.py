from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from chunkkv_cli.compress.base import Capabilities, Compressor


@dataclass
class StreamingLLM(Compressor):
    """Attention sinks plus the most recent tokens; no scoring.

    Based on Xiao et al., "Efficient Streaming Language Models with Attention Sinks"
    (https://arxiv.org/abs/2309.17453).

    Parameters
    ----------
    sinks : int, default 4
        The first tokens, always kept.
    """

    sinks: int = 4

    name: ClassVar[str] = "streamingllm"
    caps: ClassVar[Capabilities] = Capabilities(prefill_select=True, window_queries=True, question_agnostic=True)

    def select_tokens(self, query, key, n_kept, window, scaling):
        kv_len = key.shape[2]
        sinks = min(self.sinks, n_kept)
        idx = torch.cat(
            [torch.arange(sinks), torch.arange(kv_len - (n_kept - sinks), kv_len)]
        ).to(key.device)
        return idx.expand(key.shape[0], n_kept)
