"""Compress once, ask many: a document's prompt prefix is prefilled and compressed without the question.

The prompt splits where the question starts (`documents.prefix_ids` / `documents.question_ids`). Only the
prefix is prefilled, so the observation window that scores the tokens (the last `window` prompt tokens) is
the document's tail, the closing `</document>` tag and `Question:`: compression is question-agnostic. Each
question then gets its own copy of the compressed cache, is appended in one forward with positions that
continue from the uncompressed prefix length (the engine's attention builds a bottom-right causal mask per
layer, and compresses only when a layer sees as many queries as keys, so the append is kept whole), and the
answer is decoded from there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from chunkkv_cli.compress import Compressor
from chunkkv_cli.compress.base import gather_tokens
from chunkkv_cli.documents import pass_request_ids
from chunkkv_cli.engine import forward, store_layer, use_compressing_attention
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.packed import PackedCache, PackedLayer
from chunkkv_cli.route import Route
from chunkkv_cli.generate import cache_bytes, decode, kept_lengths, new_target, prefill, synchronize
from chunkkv_cli.pipeline import stream_answer
from chunkkv_cli.result import Answer


@dataclass
class CompressedPrefix:
    """A prompt prefix's compressed KV cache, layer by layer, batch 1.

    keys/values: per layer (1, kv_heads, n_kept, head_dim), after RoPE. positions: per layer the kept
    tokens' original positions, (1, n_kept) for methods that share indices across heads, (1, kv_heads, n_kept)
    for per-head ones. prefix_len: the uncompressed length, i.e. the position the question starts at.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    prefix_len: int
    full_bytes: int = 0  # what the uncompressed prefix's KV would take
    prefill_seconds: float = 0.0
    compress_seconds: float = 0.0
    # Per layer, tokens kept by each KV head when heads keep lengths of their own (kvzip budget_shape=heads):
    # keys/values are then (total, head_dim), heads one after another, and positions (total,).
    head_lengths: list[list[int]] | None = None

    def kept_lengths(self) -> list[float]:
        """Tokens per layer (per KV head on average where heads keep lengths of their own)."""
        if self.head_lengths is not None:
            return [sum(lengths) / len(lengths) for lengths in self.head_lengths]
        return [k.shape[-2] for k in self.keys]

    def kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def compress_prefix(
    model, ids: list[int], compressor: Compressor, reuse_layers: int = 1, on_layer=None, tokenizer=None
) -> CompressedPrefix:
    """Prefill `ids` (the prefix alone) and keep each layer's compressed KV and kept positions.

    `tokenizer` phrases the request of a method with a pass of its own (KVzip's "repeat the context").
    """
    device = next(model.parameters()).device
    target = new_target(model, compressor, reuse_layers, record=True)
    request = pass_request_ids(tokenizer, compressor)
    pre = prefill(model, torch.tensor([ids], device=device), [target], on_layer, request)
    layers = target.cache.layers
    packed = isinstance(target.cache, PackedCache)
    return CompressedPrefix(
        keys=[layer.prefix_keys if packed else layer.keys for layer in layers],
        values=[layer.prefix_values if packed else layer.values for layer in layers],
        positions=[target.kept[i] for i in range(len(layers))],
        prefix_len=len(ids),
        full_bytes=pre.full_bytes,
        prefill_seconds=pre.seconds,
        compress_seconds=pre.compress_seconds,
        head_lengths=[layer.lengths for layer in layers] if packed else None,
    )


def layer_device(model, layer_idx: int) -> torch.device:
    """Where decoder layer `layer_idx` computes: its accelerate hook's execution device, else its weights'."""
    layer = model.get_decoder().layers[layer_idx]
    hooked = getattr(getattr(layer, "_hf_hook", None), "execution_device", None)
    return torch.device(hooked) if hooked is not None else next(layer.parameters()).device


def cache_copy(model, prefix: CompressedPrefix) -> DynamicCache | PackedCache:
    """A fresh cache holding copies of the prefix's tensors, each layer on its layer's device, in the model's dtype.

    A prefix whose heads keep lengths of their own gives a `PackedCache`, else a DynamicCache.
    """
    dtype = next(model.parameters()).dtype
    copies = [
        [t.to(layer_device(model, layer_idx), dtype, copy=True) for t in (keys, values)]
        for layer_idx, (keys, values) in enumerate(zip(prefix.keys, prefix.values))
    ]
    if prefix.head_lengths is not None:
        return PackedCache([PackedLayer(k, v, lengths) for (k, v), lengths in zip(copies, prefix.head_lengths)])
    cache = DynamicCache(config=model.config)
    for layer_idx, (keys, values) in enumerate(copies):
        store_layer(cache, layer_idx, keys, values, seen=prefix.prefix_len)
    return cache


@torch.inference_mode()
def append(model, cache, ids: list[int], start_pos: int, route=None) -> torch.Tensor:
    """Feed `ids` in one forward at positions start_pos, start_pos + 1, ...; returns the last logits (1, vocab)."""
    use_compressing_attention(model)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    positions = torch.arange(start_pos, start_pos + len(ids), device=device)[None]
    out = forward(model, input_ids, cache, positions, route=route, last_only=True)
    return out.logits[:, -1].float()


class Narrowing(Route):
    """A question appended to a stored cache re-selects the stored tokens, with the question as the window.

    A cache compressed without its question (kept generously) is cut further per question by a method
    that scores from window queries (`caps.window_queries`): after each layer's attention, the question's
    queries score the stored tokens and only `n_keep` of them stay, beside the question's own.
    """

    def __init__(self, compressor: Compressor, cache, n_keep: int):
        if not (compressor.caps.prefill_select and compressor.caps.window_queries):
            raise ChunkKVError(f"{compressor.name} cannot narrow a stored cache (it does not score from window queries)")
        self.compressor, self.cache, self.n_keep = compressor, cache, n_keep

    def after_attention(self, layer_idx, query, key, value, scaling):
        q_len = query.shape[2]
        if key.shape[2] - q_len <= self.n_keep:
            return
        idx = self.compressor.select_tokens(query, key, self.n_keep + q_len, q_len, scaling)
        store_layer(self.cache, layer_idx, gather_tokens(key, idx), gather_tokens(value, idx))


def with_question(model, prefix: CompressedPrefix, question_ids: list[int], narrow: Compressor | None = None):
    """A copy of `prefix` with the question appended: (cache, last logits, position of the first answer token).

    `narrow`: a window-scoring method that keeps only its share of the document (of `prefix_len`) per layer.
    """
    if narrow is not None and prefix.head_lengths is not None:
        raise ChunkKVError("a cache whose KV heads keep lengths of their own (kvzip budget_shape=heads) cannot be "
                           "narrowed per question; ask without --ratio")  # fmt: skip
    cache = cache_copy(model, prefix)
    route = None if narrow is None else Narrowing(narrow, cache, narrow.kept_tokens(prefix.prefix_len))
    logits = append(model, cache, question_ids, prefix.prefix_len, route)
    return cache, logits, prefix.prefix_len + len(question_ids)


def question_tokens(model, prefix: CompressedPrefix, question_ids: list[int], max_new_tokens: int = 128, **kwargs):
    """Greedy (or sampled) token ids, (1, n_generated), answering from a copy of `prefix`; `kwargs` go to decode."""
    cache, logits, start_pos = with_question(model, prefix, question_ids)
    return decode(model, cache, logits, start_pos, max_new_tokens, **kwargs)


def answer_question(
    model,
    tokenizer,
    prefix: CompressedPrefix,
    question_ids: list[int],
    max_new_tokens: int = 128,
    on_text: Callable[[str], None] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    decoder: str = "hf",
    narrow: Compressor | None = None,
) -> Answer:
    """One question from its own copy of the compressed prefix, streamed through `on_text`.

    prefill_seconds is the question's append alone; compress_seconds is 0 (the prefix was compressed before).
    `narrow` re-selects the stored tokens with the question as the window (see `Narrowing`).
    """
    device = next(model.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    cache, logits, start_pos = with_question(model, prefix, question_ids, narrow)
    synchronize(device)
    appended = time.perf_counter() - start
    kept = [n - len(question_ids) for n in kept_lengths(cache)]  # after narrowing, if any
    kept_bytes = prefix.kept_bytes() if narrow is None else cache_bytes(cache)
    decoded = stream_answer(
        model, tokenizer, cache, logits, start_pos, max_new_tokens, on_text, temperature, top_p, decoder
    )
    return Answer(
        prompt_tokens=start_pos,
        kept_tokens=sum(kept) / len(kept),
        full_kv_bytes=prefix.full_bytes,
        kept_kv_bytes=kept_bytes,
        prefill_seconds=appended,
        compress_seconds=0.0,
        kept_per_layer=kept,
        **decoded,
    )
