"""The route: what one forward's attention does beyond plain SDPA (see `engine.compressing_attention`)."""

from __future__ import annotations

import torch


def is_sliding(layer) -> bool:
    """A cache layer that holds a sliding window (the model's own, never compressed by chunkkv)."""
    return bool(getattr(layer, "is_sliding", False))


class Route:
    """Handed to the attention function of every layer for one forward. Subclasses override either hook."""

    # True for a route whose `attend` is plain causal softmax attention: on layers with soft-capped logits or
    # attention sinks (Gemma 2, GPT-OSS) the engine then computes the model's own and calls `after_attention`.
    plain_attention_only = False

    def attend(self, layer_idx: int, query, key, value, scaling: float) -> torch.Tensor | None:
        """The attention output (batch, q_len, q_heads, d) computed here, or None for plain SDPA.

        query: (batch, q_heads, q_len, d) after RoPE; key/value: the layer's cache after this forward's update.
        """
        return None

    def after_attention(self, layer_idx: int, query, key, value, scaling: float) -> None:
        """Called with the layer's rotated queries and its cache's keys/values once attention has run."""

    def sliding_layer(self, layer_idx: int, query, key, value) -> None:
        """Called instead of both hooks on a sliding-window layer, which keeps the window cache the model defines.

        key/value: what the layer attended to (its window before this forward, then this forward's tokens).
        """
