from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from chunkkv_cli.compress.base import Capabilities, Compressor


@dataclass
class FullKV(Compressor):
    """No compression: the reference every method is compared with."""

    name: ClassVar[str] = "fullkv"
    caps: ClassVar[Capabilities] = Capabilities(evicts=False, question_agnostic=True)

    def kept_tokens(self, kv_len: int) -> int:
        return kv_len

    def select(self, query, key, layer_idx, n_layers, scaling):
        return None
