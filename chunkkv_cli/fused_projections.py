"""One matrix-vector product where a layer runs several on the same input: q/k/v, and gate/up.

At batch 1 a decode step is its weights read once, and cuBLAS reads small matrices slowly: on an H200
the 1024-row k and v projections of an 8B model reach a quarter of the copy bandwidth, q and o about
two thirds, the 14k-row MLP matrices nine tenths (benchmarks/results/decode_floor_*.json). Stacking q, k
and v into one matrix (and gate with up) gives one larger product that runs near the MLP's rate.

The model's code calls its projections one by one (`q_proj(x)`, then `k_proj(x)`, ...). During a step
of the `fast` or `compiled` decoder, the first projection of each group is replaced by a module that
computes the stacked product and hands each sibling its slice; the siblings return that slice. The
stacked weight is built once and the original Linear weights become views into it, so no memory is
added; outside a decode step the model's own modules are in place and compute exactly as before.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))

_stacked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class StackedFirst(nn.Module):
    """Runs the stacked product, keeps its own slice, hands the others to the sibling modules."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], siblings: list["Handed"]):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.sizes, self.siblings = sizes, siblings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        for sibling, part in zip(self.siblings, parts[1:]):
            sibling.handed = (x, part)
        return parts[0]


class Handed(nn.Module):
    """A later projection of a group: the slice the first one handed over, or its own product if none was."""

    def __init__(self, original: nn.Linear):
        super().__init__()
        self.original = original
        self.handed: tuple[torch.Tensor, torch.Tensor] | None = None  # (the input it was computed from, the slice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handed, self.handed = self.handed, None
        if handed is None or handed[0] is not x:  # a model that calls this one first, or on another input
            return self.original(x)
        return handed[1]


def stack_group(parent: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]] | None:
    """Replacements for `parent`'s projections `names` (weights moved into one stacked matrix), or None."""
    linears = [getattr(parent, name, None) for name in names]
    if not all(type(m) is nn.Linear for m in linears) or len({m.in_features for m in linears}) != 1:
        return None
    if len({m.bias is None for m in linears}) != 1 or len({(m.weight.dtype, m.weight.device) for m in linears}) != 1:
        return None
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    start = 0
    for m in linears:  # the originals become views of the stacked storage: same values, no second copy
        rows = slice(start, start + m.out_features)
        m.weight = nn.Parameter(weight[rows], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[rows], requires_grad=m.bias.requires_grad)
        start += m.out_features
    siblings = [Handed(m) for m in linears[1:]]
    first = StackedFirst(weight, bias, [m.out_features for m in linears], siblings)
    return [(names[0], first)] + list(zip(names[1:], siblings))


def replacements(model) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """(parent, name, original, replacement) for every group of every layer; stacked once per model.

    Stacked outside inference mode: the model's own weights become views of the stacked matrices, and a
    weight made in inference mode would break any later forward that autograd records.
    """
    if model not in _stacked:
        with torch.inference_mode(False), torch.no_grad():
            _stacked[model] = _stack_layers(model)
    return _stacked[model]


def _stack_layers(model) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    found = []
    for layer in getattr(getattr(model, "model", model), "layers", []):
        for child, names in GROUPS:
            parent = getattr(layer, child, None)
            swaps = None if parent is None else stack_group(parent, names)
            found += [(parent, name, getattr(parent, name), new) for name, new in swaps or []]
    return found


@contextlib.contextmanager
def stacked_projections(model):
    """Inside: each layer's q/k/v and gate/up run as one product each."""
    swaps = replacements(model)
    for parent, name, _, new in swaps:
        setattr(parent, name, new)
    try:
        yield
    finally:
        for parent, name, original, _ in swaps:
            setattr(parent, name, original)
