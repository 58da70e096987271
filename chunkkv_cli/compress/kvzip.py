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

from chunkkv_cli import kvzip_kernels
from chunkkv_cli.compress.base import Capabilities, Compressor, group_queries, window_indices
from chunkkv_cli.compress.chunkkv import chunk_maxima, keep_top_chunks
from chunkkv_cli.errors import ChunkKVError
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
    chunk_size : int, default 10
        Tokens per chunk kept or dropped together (1 = token by token).
    heads : str, default "shared"
        "shared": one index set per layer (a token's score is its best head's), as ChunkKV;
        "each": every KV head picks its own chunks (same count per head).
    budget_shape : str, default "adaptive"
        "adaptive": one threshold over all layers' chunk scores, so layers keep different lengths and
        the total equals a uniform budget's; "uniform": the same budget in every layer.
    sinks : int, default 4
        The first tokens, always kept.
    repeat_chunk : int, default 2048
        Document tokens per repeat piece (each piece attends to the whole document).
    block : int, default 512
        Repeat queries scored at a time (memory vs. speed).
    """

    chunk_size: int = 10
    heads: str = "shared"
    budget_shape: str = "adaptive"
    sinks: int = 4
    repeat_chunk: int = 2048
    block: int = 512

    pass_request: ClassVar[str] = REPEAT_REQUEST
    name: ClassVar[str] = "kvzip"
    caps: ClassVar[Capabilities] = Capabilities(own_pass=True, question_agnostic=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heads not in ("shared", "each"):
            raise ChunkKVError(f"kvzip: heads must be shared or each, got {self.heads!r}")
        if self.budget_shape not in ("adaptive", "uniform"):
            raise ChunkKVError(f"kvzip: budget_shape must be adaptive or uniform, got {self.budget_shape!r}")
        if min(self.chunk_size, self.repeat_chunk, self.block) < 1 or self.sinks < 0:
            raise ChunkKVError("kvzip: chunk_size, repeat_chunk and block must be >= 1, sinks >= 0")

    def select(self, query, key, layer_idx, n_layers, scaling):
        return None  # the whole document stays until the reconstruction pass has scored it

    @torch.inference_mode()
    def score_pass(self, model, cache, prompt_ids, repeat_prompt=(), on_layer=None):
        scores = reconstruction_scores(model, cache, prompt_ids, list(repeat_prompt), self.repeat_chunk, self.block)
        return self.keep(scores)

    def keep(self, scores: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Per layer, the kept positions from (batch, kv_heads, doc_len) scores: sinks, best chunks, window."""
        doc_len = scores[0].shape[-1]
        n_kept = self.kept_tokens(doc_len)
        window, sinks = min(self.window, n_kept), min(self.sinks, max(0, n_kept - self.window))
        if n_kept >= doc_len:
            return [None] * len(scores)
        pooled = [self._token_scores(s[..., : doc_len - window], sinks) for s in scores]
        counts = self._layer_counts(pooled, n_kept - window)
        return [self._layer_indices(p, count, window, doc_len) for p, count in zip(pooled, counts)]

    def _token_scores(self, scores: torch.Tensor, sinks: int) -> torch.Tensor:
        scores = scores.amax(dim=1) if self.heads == "shared" else scores
        scores = scores.clone()
        scores[..., :sinks] = float("inf")
        return scores

    def _layer_counts(self, pooled: list[torch.Tensor], total: int) -> list[int]:
        """Prefix tokens each layer keeps: `total` everywhere, or its share under one threshold over all layers.

        The threshold is the score of the last chunk that still fits `total` tokens per layer on average;
        a layer keeps as many tokens as its chunks (averaged over its heads) above it. Batch 1 only.
        """
        n_layers, prefix_len = len(pooled), pooled[0].shape[-1]
        if self.budget_shape == "uniform" or pooled[0].shape[0] != 1:
            return [total] * n_layers
        best = torch.stack([chunk_maxima(p, self.chunk_size).flatten(0, -2) for p in pooled])  # (layers, rows, chunks)
        rows = best.shape[1]  # 1 shared index set, or one per KV head
        size = torch.full_like(best, self.chunk_size)
        size[..., -1] = prefix_len - self.chunk_size * (best.shape[-1] - 1)
        order = best.flatten().argsort(descending=True)
        fits = size.flatten()[order].cumsum(0) <= total * n_layers * rows
        taken = torch.zeros(best.numel(), device=best.device).index_fill_(0, order[fits], 1).view_as(best)
        tokens = (taken * size).sum(dim=(1, 2)) / rows
        return [min(int(t), prefix_len) for t in tokens.tolist()]

    def _layer_indices(self, scores: torch.Tensor, count: int, window: int, doc_len: int) -> torch.Tensor:
        count = max(count, min(self.sinks, scores.shape[-1]))
        flat = scores.reshape(-1, scores.shape[-1])
        chunks = keep_top_chunks(flat, self.chunk_size, count, pool="max").view(*scores.shape[:-1], count)
        return torch.cat([chunks, window_indices(doc_len, window, chunks)], dim=-1)


def repeat_pieces(prompt_ids: torch.Tensor, repeat_prompt: list[int], repeat_chunk: int):
    """The teacher-forced repeat, piece by piece: the request, the previous piece's last tokens, the next stretch."""
    request = prompt_ids.new_tensor(repeat_prompt).expand(prompt_ids.shape[0], -1)
    doc_len = prompt_ids.shape[1]
    for start in range(0, doc_len, repeat_chunk):
        lead = max(0, start - OVERLAP)
        yield torch.cat([request, prompt_ids[:, lead : start + repeat_chunk]], dim=1)


def reconstruction_scores(model, cache, prompt_ids, repeat_prompt, repeat_chunk: int, block: int) -> list[torch.Tensor]:
    """Per layer (batch, kv_heads, doc_len): the largest attention weight each cached token gets from the repeat."""
    from chunkkv_cli.engine import forward

    doc_len = prompt_ids.shape[1]
    route = ReconstructionRoute(cache, doc_len, block)
    for piece in repeat_pieces(prompt_ids, repeat_prompt, repeat_chunk):
        positions = torch.arange(doc_len, doc_len + piece.shape[1], device=piece.device)[None]
        forward(model, piece, cache, positions, route=route, last_only=True)
    return route.scores


class ReconstructionRoute(Route):
    """Attention of a repeat piece over the document and itself, keeping each document token's best weight.

    The cache grows by the piece in every layer's update; the piece's own K/V is cut off again here.
    """

    def __init__(self, cache, doc_len: int, block: int):
        self.cache, self.doc_len, self.block = cache, doc_len, block
        self.scores: list[torch.Tensor | None] = [None] * len(cache.layers)

    def attend(self, layer_idx, query, key, value, scaling):
        if kvzip_kernels.available(query.device, query.shape[-1], query.dtype):
            output, best = kvzip_kernels.attend_and_score(query, key, value, self.doc_len, scaling)
        else:
            output, best = attend_and_score(query, key, value, self.doc_len, scaling, self.block)
        previous = self.scores[layer_idx]
        self.scores[layer_idx] = best if previous is None else torch.maximum(previous, best)
        layer = self.cache.layers[layer_idx]
        layer.keys, layer.values = key[:, :, : self.doc_len], value[:, :, : self.doc_len]
        return output


def attend_and_score(query, key, value, doc_len: int, scaling: float, block: int):
    """Exact causal attention of the last q_len positions, and each of the first doc_len keys' best weight.

    query: (b, q_heads, n, d); key/value: (b, kv_heads, kv_len, d) whose last n rows are the queries' own.
    Returns the output (b, n, q_heads, d) and scores (b, kv_heads, doc_len) in fp32. `block` queries at a time,
    so no n x kv_len matrix larger than a block exists.
    """
    b, q_heads, n, d = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    q = group_queries(query, kv_heads)  # (b, kv_heads, group, n, d)
    group = q.shape[2]
    out = torch.empty_like(q)
    best = torch.zeros(b, kv_heads, doc_len, dtype=torch.float32, device=key.device)
    keys_t = key.transpose(-1, -2)
    columns = torch.arange(kv_len, device=key.device)
    for start in range(0, n, block):
        rows = q[:, :, :, start : start + block]
        m = rows.shape[3]
        logits = torch.matmul(rows.reshape(b, kv_heads, group * m, d), keys_t).view(b, kv_heads, group, m, kv_len)
        future = columns[None, :] > (kv_len - n + start + torch.arange(m, device=key.device))[:, None]
        probs = (logits.float() * scaling).masked_fill_(future, float("-inf")).softmax(dim=-1)
        best = torch.maximum(best, probs[..., :doc_len].amax(dim=(2, 3)))
        out[:, :, :, start : start + block] = torch.matmul(probs.to(value.dtype).view(b, kv_heads, group * m, kv_len), value).view(b, kv_heads, group, m, d)
    return out.reshape(b, q_heads, n, d).transpose(1, 2).contiguous(), best
