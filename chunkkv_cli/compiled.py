"""The `compiled` decoder's kernels: each decoder layer compiled by Inductor once, shared by every layer.

Compiling the whole model traces all its layers into one graph (a minute or more for an 8B model, and
again for every new cache length). Here each repeated module (the decoder layers, the final norm, the
rotary embedding) is compiled on its own, and the two calls that differ from layer to layer, the cache
write (`SlotBuffers.update`) and attention (`engine.compressing_attention`), are left out of the graphs
(`torch.compiler.disable`). What remains of a layer (norms, projections, RoPE, the MLP) is the same
graph for every layer and every cache length, so Inductor compiles it once per model shape and batch
size, and its on-disk cache (under chunkkv's cache folder) serves later runs.

Dynamo still re-traces the attention module once per layer (it reads `layer_idx` to pass it on); those
traces give identical graphs, which Inductor's cache answers, so they cost tracing only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from pathlib import Path

import torch

_regions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Dynamo's default recompile limit (8) is below one re-trace per layer of a deep model.
_DYNAMO_SETTINGS = {"recompile_limit": 1024, "accumulated_recompile_limit": 8192}


def use_persistent_cache() -> Path:
    """Keep compiled kernels between runs under chunkkv's cache folder, unless TORCHINDUCTOR_CACHE_DIR names another.

    Importing torch._dynamo sets that variable to torch's default (under /tmp) when it is unset, so a value equal
    to the default is taken as unset. Inductor reads the variable at each use, so this holds from the first compile.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and current != default_cache_dir():
        return Path(current)
    path = Path(os.environ.get("CHUNKKV_CACHE", Path.home() / ".cache" / "chunkkv")) / "inductor"
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
            (module, torch.compile(type(module).forward.__get__(module), dynamic=False))
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


def report_compile(seconds: float) -> None:
    """One line on stderr with the one-time cost, so a slow first token is not taken for a slow decoder."""
    logging.getLogger("chunkkv").warning(
        "note: compiled decode step ready in %.1f s (compiled once per model shape and batch size; kept in %s for later runs)",
        seconds, os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's cache"),
    )
