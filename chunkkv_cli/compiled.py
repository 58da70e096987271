"""The `compiled` decoder's kernels: each decoder layer compiled by Inductor once, shared by every layer.

Compiling the whole model traces all its layers into one graph (a minute or more for an 8B model, and
again for every new cache length). Here each repeated module (the decoder layers, the final norm, the
rotary embedding) is compiled on its own, and the two calls that differ from layer to layer, the cache
write (`SlotBuffers.update`) and attention (`engine.compressing_attention`), are left out of the graphs
(`torch.compiler.disable`). What remains of a layer (norms, projections, RoPE, the MLP) is the same
graph for every layer and every cache length, so Inductor compiles it once per model shape and batch
size, and its on-disk cache (under chunkkv's cache folder) serves later runs.

The attention module passes its `layer_idx` on to those calls; Dynamo would specialize on that integer and
trace every layer again (a second or so each at 8B). Here it is taken as an input (`allow_unspec_int_on_nn_module`,
and `dynamic=None`, so the first layer's trace is kept and the second makes the integer symbolic), so the number
of traces does not grow with the depth.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from pathlib import Path

import torch

from chunkkv_cli.model import cache_dir

_regions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_DYNAMO_SETTINGS = {"allow_unspec_int_on_nn_module": True, "recompile_limit": 64}


def use_persistent_cache() -> Path:
    """Keep compiled kernels between runs under chunkkv's cache folder, unless TORCHINDUCTOR_CACHE_DIR names another.

    Importing torch._dynamo sets that variable to torch's default (under /tmp) when it is unset, so a value equal
    to the default is taken as unset. Inductor reads the variable at each use, so this holds from the first compile.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and current != default_cache_dir():
        return Path(current)
    path = cache_dir() / "inductor"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def repeated_modules(model) -> list[torch.nn.Module]:
    """The decoder layers, then the final norm and rotary embedding where the model has them."""
    inner = getattr(model, "model", model)
    found = list(getattr(inner, "layers", []))
    found += [m for m in (getattr(inner, "norm", None), getattr(inner, "rotary_emb", None)) if m is not None]
    return found


def _compiled_forwards(model) -> list[tuple[torch.nn.Module, object]]:
    if model not in _regions:
        use_persistent_cache()
        import torch._inductor.config as inductor

        inductor.coordinate_descent_tuning = bool(os.environ.get("CHUNKKV_COMPILE_TUNING"))
        _regions[model] = [
            (module, torch.compile(type(module).forward.__get__(module), dynamic=None))
            for module in repeated_modules(model)
        ]
    return _regions[model]


@contextlib.contextmanager
def compiled_regions(model):
    """Inside: the model's repeated modules run their compiled forwards (compiling on first use)."""
    regions = _compiled_forwards(model)
    for module, forward in regions:
        module.forward = forward
    try:
        with torch._dynamo.config.patch(_DYNAMO_SETTINGS):
            yield
    finally:
        for module, _ in regions:
            del module.forward


_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> batch sizes compiled in this process


def is_built(model, batch: int) -> bool:
    """Whether this process has compiled a decode step of `model` at `batch` (later builds take a fraction of a second)."""
    return batch in _built.get(model, ())


def mark_built(model, batch: int) -> None:
    _built.setdefault(model, set()).add(batch)


def announce_compile() -> None:
    """A line before the one-time build, so the pause before the first token is explained while it lasts."""
    logging.getLogger("chunkkv").warning(
        "note: compiling the decode step (once per model shape and batch size; later runs reuse %s) ...",
        os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's cache"),
    )


def report_compile(seconds: float) -> None:
    """The one-time cost, so a slow first token is not taken for a slow decoder."""
    logging.getLogger("chunkkv").warning("note: decode step compiled in %.1f s", seconds)
