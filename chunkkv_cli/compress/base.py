"""What every compression method shares: budgets, the observation-window score, top-k with the window."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F

from chunkkv_cli.compress.graphs import GraphedSelection
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.memory import check_ratio_budget, kept_tokens


@dataclass(frozen=True)
class Capabilities:
    """What a method needs and when it acts; the engine, decoders and commands ask these, never a name.

    prefill_select: chooses tokens while each layer is prefilled, from its queries and keys (`select_tokens`).
    window_queries: scores from the last `window` queries alone, so a later question's queries can be the window.
    own_pass: needs a scoring pass of its own over the document after it is prefilled (`score_pass`).
    per_step: keeps everything and selects what to attend at every decode step (`decode_route`).
    per_head: kept tokens (and budgets) differ between KV heads.
    evicts: drops tokens from the cache, so less memory is held after compression.
    reusable: one compression of a document can serve questions asked later (compress, batch).
    question_agnostic: scores a document without its question (the default for compress-once paths).
    """

    prefill_select: bool = False
    window_queries: bool = False
    own_pass: bool = False
    per_step: bool = False
    per_head: bool = False
    evicts: bool = True
    reusable: bool = True
    question_agnostic: bool = False


@dataclass
class Compressor:
    """Chooses, per layer, which prompt tokens stay in the KV cache.

    Parameters
    ----------
    ratio : float, optional
        Fraction of the prompt's tokens kept per layer, in (0, 1] (0.1 keeps 10 %).
    budget : int, optional
        Tokens kept per layer, window included. Overrides ``ratio``.
    window : int, default 32
        The last ``window`` prompt tokens are always kept; methods that score use their queries.
    """

    ratio: float | None = None
    budget: int | None = None
    window: int = 32

    name: ClassVar[str] = "base"
    caps: ClassVar[Capabilities] = Capabilities()
    # For `caps.own_pass`: what the pass asks the model, appended after the document as a question would be.
    pass_request: ClassVar[str | None] = None
    # Selection reads only the window's queries and the keys, with one budget for every layer:
    # it can then be captured once per prompt as a CUDA graph and replayed by the other layers.
    graphable: ClassVar[bool] = False
    _graphs: GraphedSelection = field(default_factory=GraphedSelection, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_ratio_budget(self.ratio, self.budget)
        if self.window < 1:
            raise ChunkKVError(f"--window must be at least 1, got {self.window}")
        if self.ratio is None and self.budget is None:
            self.ratio = 0.1

    def kept_tokens(self, kv_len: int) -> int:
        """Tokens every layer keeps on average (the uniform budget)."""
        return kept_tokens(kv_len, self.ratio, self.budget)

    def layer_budget(self, kv_len: int, layer_idx: int, n_layers: int) -> int:
        return self.kept_tokens(kv_len)

    def select(self, query: torch.Tensor, key: torch.Tensor, layer_idx: int, n_layers: int, scaling: float):
        """Indices of the tokens to keep, sorted, or None to keep everything.

        query: (batch, q_heads, kv_len, head_dim); key: (batch, kv_heads, kv_len, head_dim), both after RoPE.
        Returns (batch, kv_heads, n_kept) for per-head methods, (batch, n_kept) for shared ones.
        """
        kv_len = key.shape[2]
        n_kept = self.layer_budget(kv_len, layer_idx, n_layers)
        if n_kept >= kv_len:
            return None
        window = min(self.window, n_kept)
        if not self.graphable:
            return self.select_tokens(query, key, n_kept, window, scaling)
        run = lambda q, k: self.select_tokens(q, k, n_kept, window, scaling)  # noqa: E731
        return self._graphs(run, (n_kept, window, scaling), query[:, :, -window:], key)

    def select_tokens(self, query, key, n_kept: int, window: int, scaling: float) -> torch.Tensor:
        raise NotImplementedError

    def score_pass(self, model, cache, prompt_ids: torch.Tensor, request=(), on_layer=None) -> list[torch.Tensor | None]:
        """For `caps.own_pass`: per layer, the indices to keep in the prefilled full `cache` (None = all).

        `request`: the token ids of `pass_request`, phrased by the caller's tokenizer (empty without one).
        """
        raise NotImplementedError

    def decode_route(self, cache):
        """For `caps.per_step`: the route that selects what each decode step attends to, built on the full cache."""
        return None

    def keeps_whole(self, kv_len: int) -> bool:
        """Whether a prompt this short is kept whole (too short for the method's fixed parts)."""
        return False

    @classmethod
    def parameters(cls) -> list[str]:
        """The keyword arguments the method takes."""
        return [f.name for f in fields(cls) if f.init]


def window_indices(kv_len: int, window: int, like: torch.Tensor) -> torch.Tensor:
    """The last `window` positions, broadcast to the leading dims of `like`."""
    idx = torch.arange(kv_len - window, kv_len, device=like.device)
    return idx.expand(*like.shape[:-1], window)


def keep_top(scores: torch.Tensor, n_kept: int, window: int) -> torch.Tensor:
    """Top (n_kept - window) prefix positions by score, sorted, followed by the window.

    scores: (..., kv_len - window) -> indices (..., n_kept).
    """
    prefix_len = scores.shape[-1]
    top = scores.topk(n_kept - window, dim=-1).indices.sort(dim=-1).values
    return torch.cat([top, window_indices(prefix_len + window, window, scores)], dim=-1)


def group_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(batch, q_heads, n, d) -> (batch, kv_heads, group, n, d): query head h reads KV head h // group."""
    b, q_heads, n, d = query.shape
    return query.view(b, kv_heads, q_heads // kv_heads, n, d)


def window_scores(
    query: torch.Tensor, key: torch.Tensor, window: int, scaling: float, pool_kernel: int = 7
) -> torch.Tensor:
    """SnapKV-style importance of every prefix token, per KV head.

    Attention of the last `window` queries to all keys (causal inside the window, softmax accumulated in fp32),
    window columns dropped, averaged over the window queries, smoothed along the sequence with an
    average pool, then averaged over the query heads of each KV group.
    Returns (batch, kv_heads, kv_len - window).
    """
    b, kv_heads, kv_len, dim = key.shape
    groups = query.shape[1] // kv_heads
    # (b, kv_heads, groups * window, d) @ (b, kv_heads, d, kv_len): one batched matmul, no broadcast copy of the keys.
    q = group_queries(query[:, :, -window:] * scaling, kv_heads).reshape(b, kv_heads, groups * window, dim)
    logits = torch.matmul(q, key.transpose(-1, -2)).view(b, kv_heads, groups, window, kv_len)
    future = torch.ones(window, window, dtype=torch.bool, device=key.device).triu(1)
    logits[..., kv_len - window :].masked_fill_(future, float("-inf"))
    # Softmax accumulates in fp32 internally; storing probabilities in the model dtype halves the traffic.
    probs = torch.softmax(logits, dim=-1)
    scores = probs[..., : kv_len - window].mean(dim=-2, dtype=torch.float32)
    if pool_kernel > 1:
        scores = F.avg_pool1d(
            scores.reshape(-1, 1, kv_len - window), pool_kernel, stride=1, padding=pool_kernel // 2
        ).view(b, kv_heads, groups, -1)
    return scores.mean(dim=2)


def gather_tokens(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Keep `indices` along the sequence axis of (batch, kv_heads, kv_len, head_dim).

    indices: (batch, kv_heads, n_kept), or (batch, n_kept) shared by all heads.
    """
    if indices.dim() == 2:
        indices = indices[:, None, :].expand(-1, states.shape[1], -1)
    return states.gather(2, indices[..., None].expand(-1, -1, -1, states.shape[-1]))


def grouped_decode_attention(query, key, value, scaling, mask=None) -> torch.Tensor:
    """Attention of one new token per sequence, with the query heads of a KV group as the rows of one SDPA call.

    query: (batch, q_heads, 1, d); key/value: (batch, kv_heads, n, d); mask: (batch, n) bool, True = attend.
    K/V are never repeated per query head. Returns (batch, 1, q_heads, d) like transformers' attention functions.
    """
    b, q_heads, _, d = query.shape
    packed = group_queries(query, key.shape[1]).squeeze(-2)  # (batch, kv_heads, group, d)
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attn_mask, scale=scaling)
    return out.reshape(b, 1, q_heads, d)
