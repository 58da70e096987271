"""Every method by name, without importing torch (so `chunkkv --help` lists them instantly).

Adding a method: its module under compress/ and one line here (docs/architecture.md has the steps). Everything else asks the class's `caps`.
"""

from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "chunkkv": "chunkkv_cli.compress.chunkkv:ChunkKV",
    "snapkv": "chunkkv_cli.compress.snapkv:SnapKV",
    "pyramidkv": "chunkkv_cli.compress.pyramidkv:PyramidKV",
    "h2o": "chunkkv_cli.compress.h2o:H2O",
    "keydiff": "chunkkv_cli.compress.keydiff:KeyDiff",
    "streamingllm": "chunkkv_cli.compress.streamingllm:StreamingLLM",
    "fullkv": "chunkkv_cli.compress.fullkv:FullKV",
    "clusterkv": "chunkkv_cli.compress.clusterkv:ClusterKV",
    "kvzip": "chunkkv_cli.compress.kvzip:KVzip",
}

# The default method when the question is in the prompt (ask DOC QUESTION, batch --question-aware), and when
# a document is compressed before its questions are known (compress, ask --questions, batch).
DEFAULT = "chunkkv"
QUESTION_AGNOSTIC_DEFAULT = "kvzip"

# The uncompressed cache: the reference row every bench and eval table is compared with.
REFERENCE = "fullkv"


def names() -> list[str]:
    return list(REGISTRY)


def load(name: str):
    """The method's class (imports torch)."""
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
