"""Compression methods, one per module, in one registry; everything else asks a method's `caps`, never its name."""

from __future__ import annotations

from dataclasses import MISSING, fields

from chunkkv_cli import registry
from chunkkv_cli.options import param_pair
from chunkkv_cli.compress.base import Capabilities, Compressor
from chunkkv_cli.errors import ChunkKVError

_methods: dict[str, type[Compressor]] = {}


def all_methods() -> dict[str, type[Compressor]]:
    """The registered method classes by name, imported on first use: a method module may import the engine,
    which imports compress.base, which runs this package's __init__ first."""
    if not _methods:
        _methods.update({name: registry.load(name) for name in registry.names()})
    return _methods


def __getattr__(name: str):
    if name == "METHODS":
        return all_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def methods_where(**wanted: bool) -> list[str]:
    """Registered method names whose capabilities match, e.g. methods_where(reusable=True)."""
    return [name for name, cls in all_methods().items() if all(getattr(cls.caps, k) == v for k, v in wanted.items())]


def method_class(name: str) -> type[Compressor]:
    try:
        return all_methods()[name]
    except KeyError:
        raise ChunkKVError(f"unknown method {name!r}; choose one of: {', '.join(registry.names())}") from None


def make_compressor(name: str, **params) -> Compressor:
    """Build a method by name; a parameter it does not take is refused, naming the ones it does."""
    cls = method_class(name)
    taken = cls.parameters()
    unknown = [k for k in params if k not in taken]
    if unknown:
        raise ChunkKVError(f"{name} takes no parameter {unknown[0]!r}; it takes: {', '.join(taken)}")
    return cls(**{k: v for k, v in params.items() if v is not None})


def typed_params(name: str, pairs) -> dict:
    """``KEY=VALUE`` strings as method `name`'s keyword arguments, each converted to its default's type."""
    cls = method_class(name)
    defaults = {f.name: f.default for f in fields(cls) if f.init}
    out = {}
    for pair in pairs:
        key, text = param_pair(pair)
        if key not in defaults:
            raise ChunkKVError(f"{name} takes no parameter {key!r}; it takes: {', '.join(defaults)}")
        out[key] = _convert(name, key, text, defaults[key])
    return out


def _convert(name: str, key: str, text: str, default):
    kind = type(default) if default is not None and default is not MISSING else str
    try:
        if kind is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        raise ChunkKVError(f"{name}: {key} must be of type {kind.__name__}, got {text!r}") from None


def applicable(name: str, **params) -> dict:
    """The subset of `params` that method `name` takes (for options set once for several methods)."""
    taken = method_class(name).parameters()
    return {k: v for k, v in params.items() if k in taken}


def compressor_for(name: str, **options) -> Compressor:
    """Build method `name` from options shared by every method (it takes those it has parameters for)."""
    return make_compressor(name, **applicable(name, **options))


__all__ = ["METHODS", "all_methods", "Capabilities", "Compressor", "applicable", "compressor_for", "make_compressor", "method_class", "methods_where", "typed_params"]
