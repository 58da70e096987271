"""Replaying token selection as a CUDA graph.

Selection is a few dozen small kernels per layer; on a GPU their launch cost, not their work,
dominates. Every layer of a prompt calls it with the same shapes, so the first call captures a
CUDA graph and the following layers copy their inputs into its buffers and replay it.
"""

from __future__ import annotations

import os
from typing import Callable

import torch


class GraphedSelection:
    """Runs `fn(query_window, key)` through a captured CUDA graph per input signature (CPU: directly)."""

    def __init__(self) -> None:
        self._graphs: dict = {}

    @staticmethod
    def enabled(key: torch.Tensor) -> bool:
        return key.device.type == "cuda" and not os.environ.get("CHUNKKV_NO_CUDA_GRAPHS")

    def __call__(self, fn: Callable, signature: tuple, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        if not self.enabled(key):
            return fn(query, key)
        signature = (query.shape, key.shape, query.dtype, key.device, *signature)
        entry = self._graphs.get(signature)
        if entry is None:
            entry = self._graphs[signature] = _capture(fn, query, key)
        graph, static_query, static_key, static_out = entry
        static_query.copy_(query)
        static_key.copy_(key)
        graph.replay()
        return static_out.clone()


def _capture(fn: Callable, query: torch.Tensor, key: torch.Tensor):
    static_query, static_key = query.clone(), key.clone()
    side = torch.cuda.Stream(device=key.device)
    side.wait_stream(torch.cuda.current_stream(key.device))
    with torch.cuda.stream(side):
        fn(static_query, static_key)  # warm-up outside the graph, as capture requires
    torch.cuda.current_stream(key.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_query, static_key)
    return graph, static_query, static_key, static_out
