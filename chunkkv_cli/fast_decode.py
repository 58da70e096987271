"""The `fast` decoder: the compressed cache copied into preallocated buffers, one decode step replayed as a CUDA graph.

The `hf` decoder runs a transformers forward per token on a `DynamicCache`, which concatenates
(copies) every layer's cache at every step and launches hundreds of small kernels from Python.
Here each layer gets a buffer sized kept + new tokens, new K/V are written in place at a
position held in a tensor, and a mask of filled slots stands in for the length, so every step has
the same shapes and addresses. On CUDA the step is captured once and replayed; on CPU it runs eagerly.
"""

from __future__ import annotations

import contextlib
import time

import torch

from chunkkv_cli import decode_kernel
from chunkkv_cli.compiled import announce_compile, compiled_regions, is_built, mark_built, report_compile, use_persistent_cache
from chunkkv_cli.compress.base import grouped_decode_attention
from chunkkv_cli.engine import drop_layer, forward
from chunkkv_cli.errors import note_once
from chunkkv_cli.fused_projections import stacked_projections
from chunkkv_cli.route import Route


class SlotBuffers(Route):
    """Per-layer buffers written one token at a time at slots held in tensors (`write_pos`, `filled`), so every
    decode step has the same shapes and addresses (CUDA graphs). Subclasses allocate keys, values and both."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    write_pos: torch.Tensor
    filled: torch.Tensor

    @torch.compiler.disable  # kept out of compiled layers: its buffers and slot differ per layer (`compiled`)
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write one new token's K/V at this layer's next slot; return the whole buffers."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        decode_kernel.write_slot(key_states, value_states, keys, values, self.write_pos[layer_idx])
        return keys, values

    def open_next_slot(self) -> None:
        """Mark every layer's next slot as filled (the new token attends to itself)."""
        self.filled += 1

    def advance(self) -> None:
        self.write_pos += 1


class StaticKV(SlotBuffers):
    """Per-layer K/V buffers of one capacity; layer l of every sequence holds its first `write_pos[l]` slots.

    Layers may hold different numbers of kept tokens (PyramidKV); `filled` (layers, batch) tells attention how many.
    The source cache is emptied layer by layer as it is copied, so memory peaks at one extra layer.
    """

    def __init__(self, cache, new_tokens: int, recall=None):
        self.recall = recall  # a per-step method's route (ClusterKV): attention over the tokens it selects
        layers = cache.layers
        lengths = [layer.keys.shape[-2] for layer in layers]
        batch, heads, _, dim = layers[0].keys.shape
        capacity = max(lengths) + new_tokens
        dtype = layers[0].keys.dtype
        self.keys, self.values = [], []
        for index, (layer, n) in enumerate(zip(layers, lengths)):
            for store, source in ((self.keys, layer.keys), (self.values, layer.values)):
                buffer = torch.zeros(batch, heads, capacity, dim, dtype=dtype, device=source.device)
                buffer[:, :, :n] = source
                store.append(buffer)
            drop_layer(cache, index)
        self.write_pos = torch.tensor(lengths, device=self.keys[0].device)
        self.filled = self.write_pos[:, None].expand(-1, batch).to(torch.int32).contiguous()

    def attend(self, layer_idx: int, query, key, value, scaling: float) -> torch.Tensor:
        """One new token per sequence over this layer's filled slots (or the clusters ClusterKV selects)."""
        lengths = self.filled[layer_idx]
        if self.recall is not None:
            picked = self.recall.static_attend(layer_idx, query, key, value, lengths, scaling)
            if picked is not None:
                return picked
        if decode_kernel.available(query.device, query.shape[-1]):
            return decode_kernel.decode_attention(query, key, value, lengths, scaling)
        mask = torch.arange(key.shape[2], device=key.device)[None, :] < lengths[:, None]
        return grouped_decode_attention(query, key, value, scaling, mask)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Kept + generated length of a layer, read on the host (not used inside captured steps)."""
        return int(self.write_pos[layer_idx])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def static_buffers(cache, new_tokens: int, recall=None):
    """The decoder's fixed-address cache: a cache with a static form of its own (per-head packed lengths) gives it."""
    to_static = getattr(cache, "to_static", None)
    return to_static(new_tokens) if to_static is not None else StaticKV(cache, new_tokens, recall)


class FastDecoder:
    """`step(token) -> logits` over a StaticKV; graph-captured on CUDA at the first step, optionally compiled."""

    def __init__(
        self, model, cache, start_pos: int, new_tokens: int, use_graph: bool | None = None, compile=False, recall=None,
        fall_back: bool = False,
    ):
        """`fall_back`: if compiling fails, decode uncompiled with a one-line note (`auto` chose to compile)."""
        self.model = model
        self.compile = compile
        self.fall_back = fall_back
        self.static = static_buffers(cache, new_tokens, recall)
        device = self.static.write_pos.device
        batch = self.static.filled.shape[1]
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.full((batch, 1), start_pos, dtype=torch.long, device=device)
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.graph = None
        self.logits = None
        self.prepared = not (self.use_graph or compile)  # eager and uncompiled: nothing to build

    def _forward(self) -> torch.Tensor:
        self.static.open_next_slot()
        with stacked_projections(self.model), compiled_regions(self.model) if self.compile else contextlib.nullcontext():
            out = forward(self.model, self.token, self.static, self.position, route=self.static)
        self.static.advance()
        self.position += 1
        return out.logits[:, -1]

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token.view(-1, 1))
        if not self.prepared:
            self._prepare()
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits

    def _prepare(self) -> None:
        """Compile (where asked) and capture (on CUDA); a failed compile decodes uncompiled if `fall_back`, else raises."""
        start = time.perf_counter()
        batch = self.token.shape[0]
        loud = self.compile and not is_built(self.model, batch)
        if loud:
            use_persistent_cache()  # so the line names the folder the kernels go to
            announce_compile()
        try:
            self._build()
        except Exception as error:  # Dynamo and Inductor raise many types; any of them means no compiled step
            if not (self.compile and self.fall_back):
                raise
            note_once(f"compiling the decode step failed ({type(error).__name__}): decoding uncompiled (--decoder fast)")
            self.compile = False
            self._build()
        if loud and self.compile:
            report_compile(time.perf_counter() - start)
            mark_built(self.model, batch)
        self.prepared = True

    def _build(self) -> None:
        if self.use_graph:
            self._capture()
        else:
            self._warm_up()  # compiles

    def _warm_up(self) -> None:
        """One step whose effects are undone (slots, lengths, position): compiles, and on a GPU fills the caches."""
        state = (self.static.write_pos, self.static.filled, self.position)
        saved = [t.clone() for t in state]
        try:
            self._forward()
        finally:
            for live, copy in zip(state, saved):
                live.copy_(copy)

    def _capture(self) -> None:
        """Warm up on a side stream, then record one step; capture runs nothing."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._warm_up()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
