"""The attention path: one function registered with transformers, steered per forward by a route.

Models are loaded with ``attn_implementation=ATTENTION_NAME``. Every forward that chunkkv runs goes
through `forward`, which hands the attention function one route object (a keyword argument that
transformers passes down to attention unchanged). A route may answer the attention itself (the fast
decoder's static buffers, ClusterKV's selected clusters, a scoring pass) and may act after it (prefill
compression). With no route the function is SDPA with a causal mask of its own. Nothing about a run is
kept in module state, so two models, or two runs of one model, never see each other's routes.

Sliding-window layers (Gemma 2 and 3, GPT-OSS, Mistral with a window) keep the window cache the model
defines: routes never change them, they only hear of them through `Route.sliding_layer`. Layers with
soft-capped logits or attention sinks, and sliding layers over more than their window, attend through
`window_attention`.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from chunkkv_cli.compress.base import Compressor, gather_tokens
from chunkkv_cli.route import Route, is_sliding
from chunkkv_cli.window_attention import needs_own_attention, windowed_attention

# Not "..._sdpa": transformers would then refuse the families whose own SDPA path it disables (Gemma 2, GPT-OSS).
ATTENTION_NAME = "chunkkv_attention"
ROUTE_KWARG = "chunkkv_route"


def bottom_right_causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean mask (True = attend) for q_len new tokens appended after kv_len - q_len cached ones."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= rows


def compressing_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA with its own causal mask (layer lengths may differ after compression), steered by the forward's route."""
    scaling = kwargs.get("scaling") or module.scaling
    route: Route | None = kwargs.pop(ROUTE_KWARG, None)
    if kwargs.get("sliding_window"):
        output = model_attention(module, query, key, value, scaling, kwargs)
        if route is not None:
            route.sliding_layer(module.layer_idx, query, key, value)
        return output, None
    extras = kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
    if route is not None and not (extras and route.plain_attention_only):
        output = route.attend(module.layer_idx, query, key, value, scaling)
        if output is not None:
            return output, None
    output = model_attention(module, query, key, value, scaling, kwargs)
    if route is not None:
        route.after_attention(module.layer_idx, query, key, value, scaling)
    return output, None


def model_attention(module, query, key, value, scaling: float, kwargs: dict) -> torch.Tensor:
    """The layer's own attention over `key`/`value`, the queries being the last positions: (b, q_len, q_heads, d)."""
    window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    q_len, kv_len = query.shape[2], key.shape[2]
    if needs_own_attention(window, softcap, sinks, q_len, kv_len):
        return windowed_attention(query, key, value, scaling, window, softcap, sinks)
    mask = bottom_right_causal_mask(q_len, kv_len, query.device) if 1 < q_len < kv_len else None
    plain = {k: v for k, v in kwargs.items() if k not in ("sliding_window", "softcap", "s_aux")}
    return sdpa_attention_forward(module, query, key, value, mask, **plain)[0]


# Opaque to torch.compile: what it does depends on the layer and the route (see `compiled`).
AttentionInterface.register(ATTENTION_NAME, torch.compiler.disable(compressing_attention))


def use_compressing_attention(model) -> None:
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)


def cache_argument(model) -> str:
    """The name the installed transformers gives the cache argument (`cache` from 5.24, `past_key_values` before).

    A wrapper whose forward names neither (`**kwargs`) gets the installed transformers' own convention.
    """
    names = inspect.signature(getattr(model, "_orig_mod", model).forward).parameters
    if "cache" not in names and "past_key_values" not in names:
        from transformers import LlamaModel

        names = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def forward(model, input_ids, cache, positions, route: Route | None = None, last_only: bool = False):
    """One model forward through the compressing attention: `route` steers it; returns the model output.

    A cache that is itself a route (per-head packed lengths) steers the forwards run on it.
    """
    if route is None and isinstance(cache, Route):
        route = cache
    kwargs = {cache_argument(model): cache, ROUTE_KWARG: route} if route is not None else {cache_argument(model): cache}
    if last_only:
        kwargs["logits_to_keep"] = 1
    return model(input_ids=input_ids, position_ids=positions, use_cache=True, **kwargs)


@dataclass
class Target:
    """One method's compressed cache being filled during prefill."""

    compressor: Compressor
    cache: DynamicCache
    reuse_layers: int = 1
    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    record: bool = False
    _last: torch.Tensor | None = None

    def indices_for(self, layer_idx, query, key, n_layers, scaling, ordinal=None):
        """Score at the first layer of each reuse group; later layers of the group reuse its indices.

        `ordinal`: the layer's place among the compressed layers (sliding ones do not count), else layer_idx.
        """
        if (layer_idx if ordinal is None else ordinal) % self.reuse_layers and self._last is not None:
            return self._last.to(key.device)
        self._last = self.compressor.select(query, key, layer_idx, n_layers, scaling)
        return self._last


class CompressionSession(Route):
    """A prefill's route: each layer's fresh KV goes to the targets' caches, compressed; times the compression."""

    def __init__(self, work_cache: DynamicCache, targets: list[Target], n_layers: int, on_layer=None):
        self.work_cache = work_cache
        self.on_layer = on_layer
        self.targets = targets
        self.n_layers = n_layers
        self.prompt_len = 0
        self.full_bytes = 0
        self._compressed = 0  # full-attention layers compressed so far
        self._timings: list = []

    def after_attention(self, layer_idx, query, key, value, scaling):
        if query.shape[2] == key.shape[2]:  # a fresh prompt, not an append to a cache
            self.compress_layer(layer_idx, query, key, value, scaling)

    def compress_layer(self, layer_idx, query, key, value, scaling):
        self.prompt_len = key.shape[2]
        self.full_bytes += key.numel() * key.element_size() + value.numel() * value.element_size()
        start = self._clock(key.device)
        for target in self.targets:
            idx = target.indices_for(layer_idx, query, key, self.n_layers, scaling, self._compressed)
            keys, values = (key, value) if idx is None else (gather_tokens(key, idx), gather_tokens(value, idx))
            store_layer(target.cache, layer_idx, keys, values)
            if target.record:
                target.kept[layer_idx] = full_range(key) if idx is None else idx.detach().cpu()
        if all(t.cache is not self.work_cache for t in self.targets):
            drop_layer(self.work_cache, layer_idx)
        self._timings.append((start, self._clock(key.device)))
        self._compressed += 1
        if self.on_layer is not None:
            self.on_layer(layer_idx)

    def sliding_layer(self, layer_idx, query, key, value):
        if query.shape[2] == key.shape[2]:  # a fresh prompt, not an append to a cache
            self.keep_window(layer_idx, key.shape[2])

    def keep_window(self, layer_idx: int, seen: int) -> None:
        """A sliding layer's window (as the work cache now holds it, after `seen` tokens) goes to every target uncompressed."""
        work = self.work_cache.layers[layer_idx]
        self.prompt_len = seen
        self.full_bytes += work.keys.numel() * work.keys.element_size() + work.values.numel() * work.values.element_size()
        for target in self.targets:
            if target.cache is not self.work_cache:
                store_layer(target.cache, layer_idx, work.keys, work.values, seen=seen)
            if target.record:
                target.kept[layer_idx] = window_positions(work.keys, seen)
        if all(t.cache is not self.work_cache for t in self.targets):
            drop_layer(self.work_cache, layer_idx)
        if self.on_layer is not None:
            self.on_layer(layer_idx)

    @staticmethod
    def _clock(device):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(device))  # the layer's own GPU when the model is split
            return event
        return time.perf_counter()

    def compress_seconds(self) -> float:
        """Time spent choosing and gathering kept tokens, all layers together."""
        total = 0.0
        for start, end in self._timings:
            if isinstance(start, float):
                total += end - start
            else:
                end.synchronize()
                total += start.elapsed_time(end) / 1000
        return total


def full_range(key: torch.Tensor) -> torch.Tensor:
    return torch.arange(key.shape[2]).expand(key.shape[0], key.shape[2])


def window_positions(keys: torch.Tensor, seen: int) -> torch.Tensor:
    """The original positions of a sliding layer's cached window: the last keys.shape[2] of `seen` tokens."""
    return torch.arange(seen - keys.shape[2], seen).expand(keys.shape[0], keys.shape[2])


def store_layer(cache: DynamicCache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, seen: int | None = None) -> None:
    """Replace a cache layer's contents (a fresh layer is initialised through its own `update`).

    A sliding layer counts the tokens it has seen, not those it holds: `seen` sets that count (its window's
    end position), which later masks and positions follow.
    """
    layer = cache.layers[layer_idx]
    if layer.keys is keys:
        return
    if not layer.is_initialized:
        layer.update(keys, values)
    else:
        layer.keys, layer.values = keys, values
    if is_sliding(layer) and seen is not None:
        layer.cumulative_length = seen


def drop_layer(cache: DynamicCache, layer_idx: int) -> None:
    """Empty one layer of the cache and release its memory (a zero-length view would keep the storage)."""
    layer = cache.layers[layer_idx]
    b, h, _, d = layer.keys.shape
    layer.keys = layer.keys.new_empty(b, h, 0, d)
    layer.values = layer.values.new_empty(b, h, 0, layer.values.shape[-1])
