"""Compression methods, one per module, in one registry; everything else asks a method's `caps`, never its name."""

from __future__ import annotations

from chunkkv_cli import registry
from chunkkv_cli.compress.base import Capabilities, Compressor
from chunkkv_cli.errors import ChunkKVError

METHODS: dict[str, type[Compressor]] = {name: registry.load(name) for name in registry.names()}


def methods_where(**wanted: bool) -> list[str]:
    """Registered method names whose capabilities match, e.g. methods_where(reusable=True)."""
    return [name for name, cls in METHODS.items() if all(getattr(cls.caps, k) == v for k, v in wanted.items())]


def method_class(name: str) -> type[Compressor]:
    try:
        return METHODS[name]
    except KeyError:
        raise ChunkKVError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def make_compressor(name: str, **params) -> Compressor:
    """Build a method by name; a parameter it does not take is refused, naming the ones it does."""
    cls = method_class(name)
    taken = cls.parameters()
    unknown = [k for k in params if k not in taken]
    if unknown:
        raise ChunkKVError(f"{name} takes no parameter {unknown[0]!r}; it takes: {', '.join(taken)}")
    return cls(**{k: v for k, v in params.items() if v is not None})


def applicable(name: str, **params) -> dict:
    """The subset of `params` that method `name` takes (for options set once for several methods)."""
    taken = method_class(name).parameters()
    return {k: v for k, v in params.items() if k in taken}


def compressor_for(name: str, **options) -> Compressor:
    """Build method `name` from options shared by every method (it takes those it has parameters for)."""
    return make_compressor(name, **applicable(name, **options))


__all__ = ["METHODS", "Capabilities", "Compressor", "applicable", "compressor_for", "make_compressor", "method_class", "methods_where"]
