"""Per-head lengths in the KV cache: every KV head keeps its own number of prefix tokens, packed, nothing padded.

A head-adaptive budget (KVzip's one threshold over all layers and KV heads) leaves each KV head of a layer
with its own count of kept tokens. `PackedLayer` stores them one head after another, keys/values
(total, head_dim) with per-head `lengths` and `offsets`, so the memory held is what was kept. Tokens appended
later (a question, generated tokens) go to a dense tail (1, kv_heads, t, head_dim), as in a `DynamicLayer`.
Attention reads each head's prefix and the tail and normalises over both at once (exact; no copy of the
prefix, no mask over padding). `PackedCache` is its own route, so `engine.forward` steers every forward on it
through `attend`; `PackedStatic` is its form for the fast decoder (a preallocated tail, a Triton kernel that
reads the per-head offsets on a GPU). One sequence (batch 1), which a head-adaptive budget requires anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkkv_cli import decode_kernel, packed_kernel
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.fast_decode import SlotBuffers
from chunkkv_cli.route import Route

BATCH_ONE = "a cache with per-head lengths (kvzip budget_shape=heads) holds one sequence: use batch 1"


@dataclass
class HeadKept:
    """One layer's kept positions when each KV head keeps its own number of them.

    positions: (total,) int64, each head's sorted positions, head 0 first; lengths: tokens per KV head.
    """

    positions: torch.Tensor
    lengths: list[int]


def is_per_head(keep: list) -> bool:
    """Whether a method's selection (one entry per layer) gives its KV heads lengths of their own."""
    return any(isinstance(idx, HeadKept) for idx in keep)


class PackedLayer:
    """One layer: each KV head's kept prefix packed in (total, d), then a dense tail (1, kv_heads, t, d)."""

    is_sliding = False
    is_initialized = True

    def __init__(self, prefix_keys, prefix_values, lengths: list[int], tail_keys=None, tail_values=None):
        if prefix_keys.shape[0] != sum(lengths) or min(lengths) < 1:
            raise ChunkKVError(f"per-head lengths {lengths} do not match {prefix_keys.shape[0]} packed tokens")
        self.prefix_keys, self.prefix_values, self.lengths = prefix_keys, prefix_values, list(lengths)
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        self.starts = starts  # on the host, for the loop over heads
        self.offsets = torch.tensor(starts, dtype=torch.int32, device=prefix_keys.device)  # for the kernel
        heads, dim = len(lengths), prefix_keys.shape[-1]
        empty = prefix_keys.new_empty(1, heads, 0, dim)
        self.keys = empty if tail_keys is None else tail_keys
        self.values = prefix_values.new_empty(1, heads, 0, prefix_values.shape[-1]) if tail_values is None else tail_values

    def update(self, key_states, value_states, *args, **kwargs):
        """Append new tokens to the tail; return the whole tail (the prefix is read by `attend`)."""
        if key_states.shape[0] != 1:
            raise ChunkKVError(BATCH_ONE)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def head_prefix(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        first, last = self.starts[head], self.starts[head + 1]
        return self.prefix_keys[first:last], self.prefix_values[first:last]

    def kept_length(self) -> float:
        """Tokens per KV head, on average: the prefix's mean length plus the tail."""
        return sum(self.lengths) / len(self.lengths) + self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return max(self.lengths) + self.keys.shape[-2]

    def nbytes(self) -> int:
        tensors = (self.prefix_keys, self.prefix_values, self.keys, self.values, self.offsets)
        return sum(t.numel() * t.element_size() for t in tensors)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ChunkKVError(BATCH_ONE)


class PackedCache(Route):
    """A cache of `PackedLayer`s that answers its own attention (handed to transformers as the cache)."""

    def __init__(self, layers: list[PackedLayer]):
        self.layers = layers

    @classmethod
    def gather(cls, cache, keep: list[HeadKept]) -> "PackedCache":
        """Each layer's kept tokens per head out of a full (batch 1) cache, whose layers are emptied one by one."""
        layers = []
        for layer_idx, kept in enumerate(keep):
            dense = cache.layers[layer_idx]
            if dense.keys.shape[0] != 1:
                raise ChunkKVError(BATCH_ONE)
            keys, values = pack(dense.keys, kept), pack(dense.values, kept)
            dense.keys = dense.values = None  # the full layer's memory goes before the next layer is gathered
            layers.append(PackedLayer(keys, values, kept.lengths))
        return cls(layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def attend(self, layer_idx, query, key, value, scaling):
        """key/value: the layer's tail after this forward's update (its last q_len tokens are the new ones)."""
        layer = self.layers[layer_idx]
        return packed_attention(query, layer, key, value, key.shape[-2], scaling)

    def kept_lengths(self) -> list[float]:
        return [layer.kept_length() for layer in self.layers]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def to_static(self, new_tokens: int) -> "PackedStatic":
        return PackedStatic(self, new_tokens)


def pack(states: torch.Tensor, kept: HeadKept) -> torch.Tensor:
    """Each head's kept tokens of (1, kv_heads, kv_len, d), one head after another: (total, d)."""
    heads = torch.repeat_interleave(torch.arange(len(kept.lengths)), torch.tensor(kept.lengths))
    rows = heads * states.shape[-2] + kept.positions.to("cpu")
    return states[0].flatten(0, 1).index_select(0, rows.to(states.device))


def packed_attention(query, layer: PackedLayer, tail_keys, tail_values, tail_len: int, scaling: float):
    """Attention of q_len new tokens over each head's packed prefix and the first `tail_len` tail slots.

    query: (1, q_heads, q_len, d), the last q_len of the tail's `tail_len` tokens (causal among them).
    Logits of prefix and tail are normalised together in fp32 per KV head; returns (1, q_len, q_heads, d).
    """
    _, q_heads, q_len, dim = query.shape
    kv_heads = len(layer.lengths)
    group = q_heads // kv_heads
    rows = torch.arange(q_len, device=query.device)[:, None] + (tail_len - q_len)
    future = torch.arange(tail_len, device=query.device)[None, :] > rows  # (q_len, tail_len)
    outputs = []
    for head in range(kv_heads):
        q = query[0, head * group : (head + 1) * group].reshape(group * q_len, dim)
        keys, values = layer.head_prefix(head)
        tail_k, tail_v = tail_keys[0, head, :tail_len], tail_values[0, head, :tail_len]
        logits_tail = (q @ tail_k.T).float().view(group, q_len, tail_len).masked_fill_(future, float("-inf"))
        logits = torch.cat([(q @ keys.T).float(), logits_tail.view(group * q_len, tail_len)], dim=-1) * scaling
        probs = logits.softmax(dim=-1).to(values.dtype)
        n = keys.shape[0]
        outputs.append(probs[:, :n] @ values + probs[:, n:] @ tail_v)
    out = torch.stack(outputs).view(q_heads, q_len, -1)
    return out.transpose(0, 1).unsqueeze(0).contiguous()


class PackedStatic(SlotBuffers):
    """The fast decoder's form of a `PackedCache`: the packed prefixes as they are, plus a preallocated tail.

    Writes slots as `fast_decode.StaticKV` does (`SlotBuffers`); attends to each head's prefix and the tail.
    """

    def __init__(self, cache: PackedCache, new_tokens: int):
        self.layers = cache.layers
        first = self.layers[0].keys
        held = first.shape[-2]
        self.capacity = held + new_tokens
        self.keys, self.values = [], []
        for layer in self.layers:
            for store, tail in ((self.keys, layer.keys), (self.values, layer.values)):
                buffer = tail.new_zeros(1, tail.shape[1], self.capacity, tail.shape[-1])
                buffer[:, :, :held] = tail
                store.append(buffer)
            layer.keys, layer.values = layer.keys[:, :, :0], layer.values[:, :, :0]
        self.write_pos = torch.full((len(self.layers),), held, device=first.device)
        self.filled = self.write_pos[:, None].to(torch.int32).contiguous()
        self.longest = max(max(layer.lengths) for layer in self.layers)

    def attend(self, layer_idx, query, key, value, scaling):
        layer = self.layers[layer_idx]
        if decode_kernel.available(query.device, query.shape[-1]):
            return packed_kernel.packed_decode_attention(
                query, layer.prefix_keys, layer.prefix_values, layer.offsets, key, value, self.filled[layer_idx],
                scaling, self.longest,
            )  # fmt: skip
        return packed_attention(query, layer, key, value, int(self.filled[layer_idx, 0]), scaling)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.layers[layer_idx].lengths) + int(self.write_pos[layer_idx])

    def nbytes(self) -> int:
        prefix = sum(layer.nbytes() for layer in self.layers)
        return prefix + sum(t.numel() * t.element_size() for t in self.keys + self.values)
