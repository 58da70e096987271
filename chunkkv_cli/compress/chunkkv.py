from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from chunkkv_cli.compress.base import Capabilities, Compressor, window_indices, window_scores
from chunkkv_cli.errors import ChunkKVError


def chunk_scores(token_scores: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Sum of token scores per consecutive chunk; the remainder forms a last, shorter chunk.

    (batch, n) -> (batch, ceil(n / chunk_size)).
    """
    pad = -token_scores.shape[-1] % chunk_size
    padded = F.pad(token_scores, (0, pad))
    return padded.view(*token_scores.shape[:-1], -1, chunk_size).sum(dim=-1)


def chunk_maxima(token_scores: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Best token score per consecutive chunk, (..., n) -> (..., ceil(n / chunk_size))."""
    pad = -token_scores.shape[-1] % chunk_size
    padded = F.pad(token_scores, (0, pad), value=float("-inf"))
    return padded.view(*token_scores.shape[:-1], -1, chunk_size).amax(dim=-1)


def keep_top_chunks(token_scores: torch.Tensor, chunk_size: int, n_keep: int, pool: str = "sum") -> torch.Tensor:
    """Positions of whole top-scoring chunks, exactly `n_keep` per row, in original order.

    A chunk scores the sum (or with pool="max", the best) of its tokens' scores. Chunks are taken best
    first; the lowest-ranked chunk taken is cut at its end when the total would overshoot.
    token_scores: (batch, n) -> (batch, n_keep).
    """
    b, n = token_scores.shape
    scores = chunk_scores(token_scores, chunk_size) if pool == "sum" else chunk_maxima(token_scores, chunk_size)
    n_chunks = scores.shape[-1]
    sizes = (n - chunk_size * torch.arange(n_chunks, device=scores.device)).clamp(max=chunk_size)
    order = scores.argsort(dim=-1, descending=True)
    sorted_sizes = sizes[order]
    taken_before = sorted_sizes.cumsum(-1) - sorted_sizes
    take_sorted = (n_keep - taken_before).clamp(min=0).minimum(sorted_sizes)
    take = torch.empty_like(take_sorted).scatter_(-1, order, take_sorted)
    positions = torch.arange(n, device=scores.device)
    keep = (positions % chunk_size) < take[:, positions // chunk_size]
    return compact(keep, n_keep)


def compact(keep: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Positions of the True entries of each row, in order; every row has exactly `n_keep` of them.

    A cumulative-sum scatter: linear time and no host sync (unlike nonzero) or sort.
    """
    b, n = keep.shape
    slot = torch.where(keep, keep.cumsum(-1) - 1, n_keep)  # dropped positions land in a spare last column
    out = torch.empty(b, n_keep + 1, dtype=torch.long, device=keep.device)
    out.scatter_(1, slot, torch.arange(n, device=keep.device).expand(b, n))
    return out[:, :n_keep]


@dataclass
class ChunkKV(Compressor):
    """Keep whole chunks of consecutive tokens, chosen by observation-window scores summed over heads.

    Based on Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context
    LLM Inference" (https://arxiv.org/abs/2502.00299). One index set per layer and sequence, shared
    by all heads. A chunk's score is the sum of its tokens' scores (as in the paper), so the short
    last chunk competes with a handicap.

    Parameters
    ----------
    chunk_size : int, default 10
        Tokens per chunk.
    pool_kernel : int, default 7
        Width of the average pool that smooths token scores before chunking.
    """

    chunk_size: int = 10
    pool_kernel: int = 7

    name: ClassVar[str] = "chunkkv"
    caps: ClassVar[Capabilities] = Capabilities(prefill_select=True, window_queries=True)
    graphable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 1:
            raise ChunkKVError(f"--chunk-size must be at least 1, got {self.chunk_size}")

    def select_tokens(self, query, key, n_kept, window, scaling):
        scores = window_scores(query, key, window, scaling, self.pool_kernel).sum(dim=1)
        chunks = keep_top_chunks(scores, self.chunk_size, n_kept - window)
        return torch.cat([chunks, window_indices(key.shape[2], window, chunks)], dim=-1)
