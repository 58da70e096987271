"""Compression methods, one per module, looked up by name."""

from __future__ import annotations

from chunkkv_cli.compress.base import Compressor
from chunkkv_cli.compress.chunkkv import ChunkKV
from chunkkv_cli.compress.clusterkv import ClusterKV
from chunkkv_cli.compress.fullkv import FullKV
from chunkkv_cli.compress.h2o import H2O
from chunkkv_cli.compress.pyramidkv import PyramidKV
from chunkkv_cli.compress.snapkv import SnapKV
from chunkkv_cli.compress.streamingllm import StreamingLLM
from chunkkv_cli.errors import ChunkKVError

METHODS: dict[str, type[Compressor]] = {
    cls.name: cls for cls in (ChunkKV, SnapKV, PyramidKV, H2O, StreamingLLM, FullKV, ClusterKV)
}


def make_compressor(name: str, **params) -> Compressor:
    """Build a method by name; parameters it does not have (e.g. chunk_size for snapkv) are ignored."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ChunkKVError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in params.items() if k in fields and v is not None})
