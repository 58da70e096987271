"""Question-agnostic compression by context reconstruction, with ChunkKV's whole chunks on top.

After the document is prefilled in full, the model is teacher-forced to repeat it (a repeat request, then
the document's own tokens, in pieces of `repeat_chunk`); every repeat piece attends to the whole document
in the cache and to itself. A cached token's importance is the largest attention weight any repeat query
gives it (max over the repeat positions and the query heads of its KV group): the tokens the model needs
to rebuild the document are the ones later questions tend to need. The repeat tokens' own KV is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from chunkkv_cli import kvzip_kernels
from chunkkv_cli.compress.base import Capabilities, Compressor, group_queries, window_indices
from chunkkv_cli.compress.chunkkv import chunk_maxima, keep_top_chunks
from chunkkv_cli.engine import bottom_right_causal_mask, forward
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.packed import HeadKept
from chunkkv_cli.route import Route

REPEAT_REQUEST = "Repeat the previous context exactly."
# Later pieces of the repeat start with the previous piece's last tokens, so the model knows where it is.
OVERLAP = 8


@dataclass
class KVzip(Compressor):
    """Keep what the model needs to reconstruct the document: compression before the question is known.

    Based on Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
    (https://arxiv.org/abs/2505.23416); scores pooled into chunks as in ChunkKV (arXiv 2502.00299).

    Parameters
    ----------
    chunk_size : int, default 1
        Tokens per chunk kept or dropped together, a chunk scoring its best token (ChunkKV's idea; 1 = token
        by token, which answered more of the bundled sample's questions than 10: README).
    heads : str, default "shared"
        "shared": one index set per layer (a token's score is its best head's), as ChunkKV;
        "each": every KV head picks its own chunks (same count per head).
    budget_shape : str, default "adaptive"
        "adaptive": one threshold over all layers' chunk scores, so layers keep different lengths and
        the total equals a uniform budget's; "uniform": the same budget in every layer; "heads": one
        threshold over every layer's and KV head's chunks, as KVzip does, each KV head keeping its own
        number of tokens, stored packed (`packed.py`: the memory held is what is kept; batch 1).
    uniform_share : float, default 0.0
        With the adaptive or heads shape, this share of the budget is spread evenly over the layers first (a floor
        for layers whose heads score low); the rest follows the threshold.
    sinks : int, default 4
        The first tokens, always kept.
    repeat_chunk : int, default 2048
        Document tokens per repeat piece (each piece attends to the whole document, or see `reach`).
    reach : int, default 2048
        Document tokens on each side of its stretch that a repeat piece attends to, besides the sinks, so the
        pass's attention grows with the document rather than its square (README: its cost and quality).
        0: the whole document, as KVzip does. Needs normalize="local".
    normalize : str, default "local"
        "local": a token's weight is a softmax over the sinks, the stretch being repeated and the piece
        itself, as KVzip does (and cheap: no piece x document matrix); "full": over everything the piece
        attends to (with reach=0).
    block : int, default 512
        Repeat queries scored at a time (memory vs. speed).
    """

    chunk_size: int = 1
    heads: str = "shared"
    budget_shape: str = "adaptive"
    sinks: int = 4
    repeat_chunk: int = 2048
    normalize: str = "local"
    uniform_share: float = 0.0
    block: int = 512
    reach: int = 2048

    pass_request: ClassVar[str] = REPEAT_REQUEST
    name: ClassVar[str] = "kvzip"
    caps: ClassVar[Capabilities] = Capabilities(own_pass=True, question_agnostic=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heads not in ("shared", "each"):
            raise ChunkKVError(f"kvzip: heads must be shared or each, got {self.heads!r}")
        if self.budget_shape not in ("adaptive", "uniform", "heads"):
            raise ChunkKVError(f"kvzip: budget_shape must be adaptive, uniform or heads, got {self.budget_shape!r}")
        if not 0 <= self.uniform_share <= 1:
            raise ChunkKVError(f"kvzip: uniform_share must be in [0, 1], got {self.uniform_share}")
        if self.normalize not in ("local", "full"):
            raise ChunkKVError(f"kvzip: normalize must be local or full, got {self.normalize!r}")
        if min(self.chunk_size, self.repeat_chunk, self.block) < 1 or min(self.sinks, self.reach) < 0:
            raise ChunkKVError("kvzip: chunk_size, repeat_chunk and block must be >= 1, sinks and reach >= 0")
        if self.reach and self.normalize == "full":
            raise ChunkKVError("kvzip: normalize=full scores over the whole document: give reach=0 with it")

    def keeps_whole(self, kv_len: int) -> bool:
        return kv_len <= self.sinks + self.window + self.chunk_size

    def select(self, query, key, layer_idx, n_layers, scaling):
        return None  # the whole document stays until the reconstruction pass has scored it

    @torch.inference_mode()
    def score_pass(self, model, cache, prompt_ids, request=(), on_layer=None):
        scores = reconstruction_scores(model, cache, prompt_ids, list(request), self)
        return self.keep(scores)

    def keep(self, scores: list[torch.Tensor]) -> list[torch.Tensor | HeadKept | None]:
        """Per layer, the kept positions from (batch, kv_heads, doc_len) scores: sinks, best chunks, window.

        A layer without scores (a sliding-window layer, which the repeat never scores) keeps its cache: None.
        With budget_shape "heads" (batch 1) each layer's entry is a `HeadKept`: every KV head its own count.
        """
        scored = [s for s in scores if s is not None]
        doc_len = scored[0].shape[-1] if scored else 0
        n_kept = self.kept_tokens(max(doc_len, 1))
        window, sinks = min(self.window, n_kept), min(self.sinks, max(0, n_kept - self.window))
        if n_kept >= doc_len or self.keeps_whole(doc_len):
            return [None] * len(scores)
        pooled = [self._token_scores(s[..., : doc_len - window], sinks) for s in scored]
        if self.budget_shape == "heads" and scored[0].shape[0] == 1:
            if len(scored) < len(scores):
                raise ChunkKVError("kvzip: budget_shape=heads needs every layer scored, and this model has "
                                   "sliding-window layers: use budget_shape=adaptive")  # fmt: skip
            return self._head_kept(pooled, n_kept - window, window, doc_len)
        adaptive = self._layer_counts(pooled, n_kept - window)
        spread = self.uniform_share * (n_kept - window)
        counts = iter([min(round(spread + (1 - self.uniform_share) * c), doc_len - window) for c in adaptive])
        pooled_iter = iter(pooled)
        return [None if s is None else self._layer_indices(next(pooled_iter), next(counts), window, doc_len) for s in scores]

    def _token_scores(self, scores: torch.Tensor, sinks: int) -> torch.Tensor:
        shared = self.heads == "shared" and self.budget_shape != "heads"
        scores = scores.amax(dim=1) if shared else scores
        scores = scores.clone()
        scores[..., :sinks] = float("inf")
        return scores

    def _layer_counts(self, pooled: list[torch.Tensor], total: int) -> list[int]:
        """Prefix tokens each layer keeps: `total` everywhere, or its share under one threshold over all layers.

        A layer keeps as many tokens as its chunks (averaged over its heads) above the threshold. Batch 1 only.
        """
        n_layers, prefix_len = len(pooled), pooled[0].shape[-1]
        if self.budget_shape == "uniform" or pooled[0].shape[0] != 1:
            return [total] * n_layers
        tokens = self._tokens_above_threshold(pooled, total).mean(dim=1)
        return [min(int(t), prefix_len) for t in tokens.tolist()]

    def _tokens_above_threshold(self, pooled: list[torch.Tensor], total: int) -> torch.Tensor:
        """(layers, rows): tokens of each row's chunks above one threshold over all layers' and rows' chunks.

        A row is the layer's shared index set or one KV head. The threshold is the score of the last chunk
        that still fits `total` tokens per row on average.
        """
        prefix_len = pooled[0].shape[-1]
        best = torch.stack([chunk_maxima(p, self.chunk_size).flatten(0, -2) for p in pooled])  # (layers, rows, chunks)
        size = torch.full_like(best, self.chunk_size)
        size[..., -1] = prefix_len - self.chunk_size * (best.shape[-1] - 1)
        order = best.flatten().argsort(descending=True)
        fits = size.flatten()[order].cumsum(0) <= total * best.shape[0] * best.shape[1]
        taken = torch.zeros(best.numel(), device=best.device).index_fill_(0, order[fits], 1).view_as(best)
        return (taken * size).sum(dim=2)

    def _head_kept(self, pooled: list[torch.Tensor], total: int, window: int, doc_len: int) -> list[HeadKept]:
        """Per layer, each KV head's kept positions (sinks, best chunks, window) under one global threshold."""
        counts = self._tokens_above_threshold(pooled, total)
        spread = self.uniform_share * total
        kept = []
        for scores, layer_counts in zip(pooled, counts.tolist()):
            rows = [
                self._layer_indices(scores[:, head : head + 1], min(round(spread + (1 - self.uniform_share) * c),
                                    doc_len - window), window, doc_len).flatten()
                for head, c in enumerate(layer_counts)
            ]  # fmt: skip
            kept.append(HeadKept(torch.cat(rows).cpu(), [row.numel() for row in rows]))
        return kept

    def _layer_indices(self, scores: torch.Tensor, count: int, window: int, doc_len: int) -> torch.Tensor:
        count = max(count, min(self.sinks, scores.shape[-1]))
        flat = scores.reshape(-1, scores.shape[-1])
        chunks = keep_top_chunks(flat, self.chunk_size, count, pool="max").view(*scores.shape[:-1], count)
        return torch.cat([chunks, window_indices(doc_len, window, chunks)], dim=-1)


def repeat_pieces(prompt_ids: torch.Tensor, repeat_prompt: list[int], repeat_chunk: int):
    """The teacher-forced repeat, piece by piece: (ids, start, end), the ids being the request, the previous
    stretch's last tokens and the stretch [start, end) of the prompt that the piece reproduces."""
    request = prompt_ids.new_tensor(repeat_prompt).expand(prompt_ids.shape[0], -1)
    doc_len = prompt_ids.shape[1]
    for start in range(0, doc_len, repeat_chunk):
        end = min(start + repeat_chunk, doc_len)
        yield torch.cat([request, prompt_ids[:, max(0, start - OVERLAP) : end]], dim=1), start, end


@torch.inference_mode()
def reconstruction_scores(model, cache, prompt_ids, repeat_prompt, comp: "KVzip") -> list[torch.Tensor]:
    """Per layer (batch, kv_heads, doc_len): the largest attention weight each cached token gets from the repeat."""
    doc_len = prompt_ids.shape[1]
    route = ReconstructionRoute(cache, doc_len, comp)
    for piece, start, end in repeat_pieces(prompt_ids, repeat_prompt, comp.repeat_chunk):
        route.span = (start, end)
        positions = torch.arange(doc_len, doc_len + piece.shape[1], device=piece.device)[None]
        forward(model, piece, PieceCache(config=model.config), positions, route=route, last_only=True)
    return route.scores


class PieceCache(DynamicCache):
    """What a repeat piece runs on: each layer's update hands the piece's own K/V straight back and stores
    nothing, so the document's cache is never copied (the route reads it where it is)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states


class ReconstructionRoute(Route):
    """Attention of a repeat piece over the document (read from `cache`) and itself, and the document's scores."""

    def __init__(self, cache, doc_len: int, comp: "KVzip"):
        self.cache, self.doc_len, self.comp = cache, doc_len, comp
        self.span = (0, doc_len)
        self.scores: list[torch.Tensor | None] = [None] * len(cache.layers)

    def attend(self, layer_idx, query, key, value, scaling):
        """key/value: the piece's own (`PieceCache`); the document's come from the cache."""
        comp, doc_len = self.comp, self.doc_len
        doc = self.cache.layers[layer_idx]
        doc_k, doc_v = self.visible(doc.keys), self.visible(doc.values)
        start, end = (0, doc_len) if comp.normalize == "full" else self.span
        if kvzip_kernels.available(query.device, query.shape[-1], query.dtype):
            output, own_lse, lse = kvzip_kernels.attend(query, doc_k, doc_v, key, value, scaling)
            best = (kvzip_kernels.best_weights(group_queries(query, key.shape[1]).flatten(2, 3), doc.keys, lse, scaling)
                    if comp.normalize == "full" else kvzip_kernels.local_scores(query, doc.keys, own_lse, self.span, comp.sinks, scaling))  # fmt: skip
        else:
            whole = torch.cat([doc.keys, key], dim=2)
            seen = whole if doc_k is doc.keys else torch.cat([doc_k, key], dim=2)
            output = attend_cpu(query, seen, torch.cat([doc_v, value], dim=2), scaling)
            key = whole
            best = (full_scores(query, key, doc_len, scaling, comp.block) if comp.normalize == "full"
                    else local_scores(query, key, doc_len, self.span, comp.sinks, scaling, comp.block))  # fmt: skip
        if self.scores[layer_idx] is None:
            self.scores[layer_idx] = best.new_zeros(*best.shape[:2], doc_len)
        region = self.scores[layer_idx][..., start:end]
        torch.maximum(region, best, out=region)
        return output

    def visible(self, doc: torch.Tensor) -> torch.Tensor:
        """The document keys or values this piece attends to: all of them, or the sinks and its `reach`."""
        reach, sinks = self.comp.reach, self.comp.sinks
        if not reach:
            return doc
        first, last = max(sinks, self.span[0] - reach), min(self.doc_len, self.span[1] + reach)
        if first <= sinks:
            return doc[:, :, :last]
        return torch.cat([doc[:, :, :sinks], doc[:, :, first:last]], dim=2)


def attend_cpu(query, key, value, scaling: float):
    """Causal attention of the piece (the last n positions) over everything cached: (b, n, q_heads, d)."""
    mask = bottom_right_causal_mask(query.shape[2], key.shape[2], query.device)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


def local_scores(query, key, doc_len: int, span: tuple[int, int], sinks: int, scaling: float, block: int):
    """KVzip's scores for the stretch a piece reproduces: softmax over the sinks, that stretch and the piece.

    Returns (b, kv_heads, end - start) in fp32, `block` query rows at a time.
    """
    start, end = span
    sinks = min(sinks, start)
    local = torch.cat([key[:, :, :sinks], key[:, :, start:end], key[:, :, doc_len:]], dim=2)
    return _best_over_queries(query, local, scaling, block, sinks, end - start)


def full_scores(query, key, doc_len: int, scaling: float, block: int):
    """Scores normalised over everything the piece attends to (the whole document and itself)."""
    return _best_over_queries(query, key, scaling, block, 0, doc_len)


def _best_over_queries(query, keys, scaling: float, block: int, first: int, count: int) -> torch.Tensor:
    """max over the group's heads and the piece's rows of softmax(q.k) (causal over the piece's own last rows),
    for key columns [first, first + count). keys: (b, kv_heads, m, d) ending with the piece's own n keys."""
    b, kv_heads, m, d = keys.shape
    n = query.shape[2]
    q = group_queries(query, kv_heads)
    best = torch.zeros(b, kv_heads, count, dtype=torch.float32, device=keys.device)
    columns = torch.arange(m, device=keys.device)
    for row in range(0, n, block):
        rows = q[:, :, :, row : row + block]
        logits = torch.matmul(rows, keys.unsqueeze(2).transpose(-1, -2)).float() * scaling
        future = columns[None, :] > (m - n + row + torch.arange(rows.shape[3], device=keys.device))[:, None]
        probs = logits.masked_fill_(future, float("-inf")).softmax(dim=-1)
        best = torch.maximum(best, probs[..., first : first + count].amax(dim=(2, 3)))
    return best
