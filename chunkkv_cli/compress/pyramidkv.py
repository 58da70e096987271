from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from chunkkv_cli.compress.snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV scoring with budgets that fall linearly with depth; same total as SnapKV.

    Based on Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling" (https://arxiv.org/abs/2406.02069).

    Parameters
    ----------
    beta : float, default 20
        The top layer keeps (budget - window) / beta prefix tokens, the bottom 2 (budget - window) minus that.
    """

    beta: float = 20.0

    name: ClassVar[str] = "pyramidkv"
    graphable: ClassVar[bool] = False  # a different budget at every layer: nothing to replay

    def layer_budget(self, kv_len: int, layer_idx: int, n_layers: int) -> int:
        uniform = self.kept_tokens(kv_len)
        window = min(self.window, uniform)
        spread = uniform - window
        top = spread / self.beta
        bottom = 2 * spread - top
        if n_layers == 1 or window + bottom > kv_len:
            return uniform  # prompt too short for the pyramid
        prefix = bottom - (bottom - top) * layer_idx / (n_layers - 1)
        return window + int(round(prefix))
