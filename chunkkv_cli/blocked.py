"""Prefill in sequence blocks: each decoder layer runs over blocks of tokens, attention over the whole prefix.

At 128k tokens the activations a layer holds for the whole sequence at once (the MLP's intermediate three
times over, the norms in fp32, RoPE's temporaries) outweigh a compressed cache tenfold. Run block by block, a
layer holds one hidden state for the sequence (written over in place), its K/V at full length (which
compression reads anyway) and one block's activations. Each block's queries attend to every key up to their
own (causal, aligned to the bottom right), so the outputs equal the unblocked pass up to float rounding, and
each layer is compressed once, at its last block, as it is unblocked. The layers' own forwards run unchanged:
`in_blocks` only calls them once per block, and is removed when the prefill's forward returns.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from chunkkv_cli.engine import store_layer
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.memory import Activations, CacheShape, human_bytes, largest_block, prefill_block_for
from chunkkv_cli.route import Route

UNFUSED_SCORES_BYTES = 1 << 28  # where no fused kernel applies, attention weights are computed this much at a time


def block_bounds(seq: int, block: int) -> list[tuple[int, int]]:
    """[start, end) of each block; the last may be short. Blocks start at multiples of `block`, so prompts of
    any length attend over the same prefix lengths and reuse the attention kernels' plans (cuDNN builds one per shape).
    """
    return [(start, min(start + block, seq)) for start in range(0, seq, block)]


class LayerBlocks:
    """Stands in for the model's cache while one layer runs block by block: K/V go into buffers of the full length.

    The attention sees every key up to its block's end; after the last block the real cache holds the layer's
    full K/V, as after an unblocked forward, and compression replaces them as it always does.
    """

    def __init__(self, cache, seq: int):
        self.cache, self.seq, self.filled = cache, seq, 0
        self.keys = self.values = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys is None:
            b, h, _, d = key_states.shape
            self.keys = key_states.new_empty(b, h, self.seq, d)
            self.values = value_states.new_empty(b, h, self.seq, value_states.shape[-1])
        start, self.filled = self.filled, self.filled + key_states.shape[2]
        self.keys[:, :, start : self.filled] = key_states
        self.values[:, :, start : self.filled] = value_states
        if self.filled == self.seq:
            store_layer(self.cache, layer_idx, self.keys, self.values)
        return self.keys[:, :, : self.filled], self.values[:, :, : self.filled]


def run_layer_in_blocks(layer_forward, bounds, hidden_states, *args, **kwargs):
    """One decoder layer over `bounds`; each block's output is written over its input, which no later block reads."""
    name = "cache" if "cache" in kwargs else "past_key_values"
    kwargs[name] = LayerBlocks(kwargs.get(name), hidden_states.shape[1])
    rope, positions = kwargs.get("position_embeddings"), kwargs.get("position_ids")
    for start, end in bounds:
        piece = dict(kwargs)
        if rope is not None:
            piece["position_embeddings"] = tuple(part[:, start:end] for part in rope)
        if positions is not None:
            piece["position_ids"] = positions[:, start:end]
        out = layer_forward(hidden_states[:, start:end], *args, **piece)
        hidden_states[:, start:end] = out[0] if isinstance(out, tuple) else out
    return hidden_states


def run_in_blocks(module_forward, bounds, hidden_states):
    """A per-token module (the final norm) over `bounds`, its output written over its input where they match in
    dtype and shape (the model's last use of that hidden state), else into a new tensor."""
    first = module_forward(hidden_states[:, : bounds[0][1]])
    same = first.dtype == hidden_states.dtype and first.shape[2:] == hidden_states.shape[2:]
    out = hidden_states if same else first.new_empty(*hidden_states.shape[:2], *first.shape[2:])
    out[:, : bounds[0][1]] = first
    for start, end in bounds[1:]:
        out[:, start:end] = module_forward(hidden_states[:, start:end])
    return out


@contextmanager
def in_blocks(model, seq: int, block: int):
    """While the `with` body runs, every decoder layer (and the final norm) of `model` runs over blocks of `block` tokens."""
    if block >= seq:
        yield
        return
    bounds = block_bounds(seq, block)
    decoder = model.get_decoder()
    patched = [(layer, run_layer_in_blocks) for layer in decoder.layers]
    if getattr(decoder, "norm", None) is not None:
        patched.append((decoder.norm, run_in_blocks))
    saved = [(module, module.__dict__.get("forward")) for module, _ in patched]
    for module, runner in patched:
        inner = module.forward
        module.forward = lambda *a, _run=runner, _inner=inner, **k: _run(_inner, bounds, *a, **k)
    try:
        yield
    finally:
        for module, own in saved:
            if own is None:
                del module.forward
            else:
                module.forward = own


def prefix_attention(query, key, value, scaling: float) -> torch.Tensor:
    """Causal attention of the last q_len positions over all kv_len keys, K/V heads shared by their query group.

    query (b, q_heads, q_len, d); key/value (b, kv_heads, kv_len, d). Returns (b, q_len, q_heads, d). Where cuDNN's
    attention applies (Hopper on): two cuDNN calls merged; else one flash-attention call; else rows at a time,
    so the weights never exceed a few hundred MB.
    """
    if cudnn_applies(query, key, value):
        return merged_attention(query, key, value, scaling).transpose(1, 2)
    b, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    rows = q_len if flash_applies(query, key, value) else max(1, UNFUSED_SCORES_BYTES // (4 * b * heads * kv_len))
    out = query.new_empty(b, heads, q_len, value.shape[-1])
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        end = kv_len - q_len + stop
        mask = causal_lower_right(stop - start, end)
        out[:, :, start:stop] = F.scaled_dot_product_attention(
            query[:, :, start:stop], key[:, :, :end], value[:, :, :end], attn_mask=mask, scale=scaling, enable_gqa=True
        )
    return out.transpose(1, 2)


def merged_attention(query, key, value, scaling: float, part=None) -> torch.Tensor:
    """The block's own keys (causal: a square) and the keys before it (no mask), merged by their log-sum-exp.

    cuDNN has no bottom-right causal mask, and is the kernel PyTorch prefers on Hopper: on an H200 one layer's
    blocks at 128k take 0.24 s this way, 0.41 s with flash's bottom-right mask, 0.25 s unblocked
    (benchmarks/results/prefix_attention_backends_h200.json). `part(q, k, v, causal, scale) -> (out, lse)`.
    """
    part = part or cudnn_part
    start = key.shape[2] - query.shape[2]
    own, own_lse = part(query, key[:, :, start:], value[:, :, start:], True, scaling)
    if start == 0:
        return own
    before, before_lse = part(query, key[:, :, :start], value[:, :, :start], False, scaling)
    shape = (*own.shape[:3], 1)
    before_lse, own_lse = before_lse.reshape(shape), own_lse.reshape(shape)
    weight = torch.exp(before_lse - torch.logaddexp(before_lse, own_lse))  # the share of the keys before the block
    return before.float().mul_(weight).add_(own.float().mul_(1 - weight)).to(query.dtype)


def cudnn_part(query, key, value, causal: bool, scaling: float):
    """(output, log-sum-exp) of cuDNN's attention; K/V heads shared by their query group."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, causal, False, scale=scaling)
    return out[0], out[1]


def cudnn_applies(query, key, value) -> bool:
    """Whether cuDNN's attention takes these tensors on a GPU where PyTorch prefers it (compute capability 9 on)."""
    if not query.is_cuda or torch.cuda.get_device_capability(query.device)[0] < 9:
        return False
    from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

    return can_use_cudnn_attention(SDPAParams(query, key, value, None, 0.0, False, True))


def flash_applies(query, key, value) -> bool:
    """Whether PyTorch's flash attention takes these tensors (K/V heads shared by query groups, no mask)."""
    if not query.is_cuda:
        return False
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    return can_use_flash_attention(SDPAParams(query, key, value, None, 0.0, False, True))


def queries_needed(compressor, seq: int) -> int:
    """Trailing prompt queries a method's selection reads: the window's, or all of them (H2O's accumulated attention)."""
    caps = compressor.caps
    window_only = caps.window_queries or compressor.graphable or not caps.prefill_select
    return min(seq, compressor.window) if window_only else seq


class BlockedSession(Route):
    """The prefill's route while layers run in blocks: attention over the prefix, compression at each layer's last block.

    `session` (an `engine.CompressionSession`) compresses exactly as in an unblocked prefill; it gets the
    layer's full keys and values and the trailing `tail` queries (kept across the layer's blocks when the
    last block alone is shorter).
    """

    plain_attention_only = True

    def __init__(self, session, seq: int, tail: int):
        self.session, self.seq, self.tail = session, seq, tail
        self._queries: list[torch.Tensor] = []

    def attend(self, layer_idx, query, key, value, scaling):
        output = prefix_attention(query, key, value, scaling)
        self.after_attention(layer_idx, query, key, value, scaling)
        return output

    def after_attention(self, layer_idx, query, key, value, scaling):
        kv_len = key.shape[2]
        first_kept = max(0, self.seq - self.tail - (kv_len - query.shape[2]))
        if first_kept < query.shape[2]:
            self._queries.append(query[:, :, first_kept:])
        if kv_len == self.seq:
            queries = self._queries[0] if len(self._queries) == 1 else torch.cat(self._queries, dim=2)
            self._queries = []
            self.session.compress_layer(layer_idx, queries, key, value, scaling)

    def sliding_layer(self, layer_idx, query, key, value):
        if key.shape[2] == self.seq:  # the layer's last block: the cache now holds its window
            self.session.keep_window(layer_idx, self.seq)


def blocked_route(session, targets, seq: int) -> BlockedSession:
    return BlockedSession(session, seq, max(queries_needed(t.compressor, seq) for t in targets))


def available_bytes(device: torch.device) -> int | None:
    """Memory this process may still allocate on `device` (its caching allocator's idle blocks included); None off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        available = min(available, int(fraction(device) * total) - allocated)
    return available


def needed_bytes(config, dtype_bytes: int, batch: int, seq: int, targets) -> Callable[[int], int]:
    """Bytes a blocked prefill needs beside the weights, as a function of the block: every target's cache at its
    prefill peak (one layer at full length) and the activations (`memory.Activations`)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = max(t.compressor.window for t in targets)
    acts = Activations(config.hidden_size, config.intermediate_size, heads, head_dim, dtype_bytes, window)
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    cache = sum(
        CacheShape(layers, kv_heads, head_dim, dtype_bytes, budget=forward_kept(t.compressor, seq)).peak(batch, seq)
        for t in targets
    )
    return lambda block: cache + acts.bytes(batch, seq, block)


def forward_kept(compressor, seq: int) -> int:
    """Tokens per layer a method's cache holds once the forward has passed (all, until its own pass, if it keeps them)."""
    caps = compressor.caps
    return seq if caps.own_pass or not caps.evicts else compressor.kept_tokens(seq)


def choose_block(model, input_ids: torch.Tensor, targets, requested: int | None) -> int:
    """Tokens per prefill block: `requested`, checked against free GPU memory, else the largest that fits up to
    `memory.AUTO_PREFILL_BLOCK`. On the CPU a requested block is used as given, and none means no blocks."""
    batch, seq = input_ids.shape
    available = available_bytes(input_ids.device)
    if available is None:
        return seq if requested is None else min(seq, requested)
    needed = needed_bytes(model.config, next(model.parameters()).element_size(), batch, seq, targets)
    fits = lambda block: needed(block) <= available  # noqa: E731
    block = prefill_block_for(seq, requested)
    best = block if fits(block) else largest_block(seq, fits, limit=None if requested is not None else block)
    if best and (requested is None or best == block):
        return best
    what = f"--prefill-block {requested:,}" if requested is not None else "the prefill"
    raise ChunkKVError(
        f"{what} needs {human_bytes(needed(block))} beside the weights for {seq:,} tokens and "
        f"{human_bytes(available)} is free on {input_ids.device}: "
        + (f"the largest block that fits is {best:,}" if best else "no block size fits; use a shorter document")
    )
