"""ClusterKV: recallable KV selection by semantic clusters of keys, at every decode step.

Nothing is evicted: the prompt is prefilled in full (`select` returns None). Afterwards each layer's
keys (sinks excluded) are clustered per KV head with cosine k-means; with that `ClusterState` as its
route, every decode step of a layer past `full_layers` attends with exact softmax only to the sinks,
the best-scoring clusters (cut to the budget exactly) and the not-yet-clustered recent tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from chunkkv_cli import cluster_kernels
from chunkkv_cli.compress.base import Capabilities, Compressor, gather_tokens, grouped_decode_attention, group_queries
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.route import Route, is_sliding


@dataclass
class ClusterKV(Compressor):
    """Attend, per decode step, to the key clusters closest to the query.

    Based on ClusterKV (Liu et al., 2024, https://arxiv.org/abs/2412.03213).

    Parameters
    ----------
    budget : int, default 1024
        Tokens attended per decode step and KV head, sinks and recent tokens included.
    sinks : int, default 16
        The first tokens, always attended and never clustered.
    tokens_per_cluster : int, default 80
        Prompt keys per cluster (400 clusters at 32k tokens).
    iterations : int, default 20
        Lloyd iterations of k-means.
    fit_per_cluster : int, default 10
        Centroids are fitted on an evenly strided sample of this many prompt tokens per cluster
        (1 in 8 at the default 80 per cluster); every token is then assigned to its nearest centroid
        once. Layers are fitted together, so the GPU sees a few large calls instead of hundreds.
    full_layers : int, default 2
        The first layers keep full attention.
    recluster_every : int, default 320
        Generated tokens are attended in full until this many have accumulated, then clustered
        into `new_clusters` clusters appended to the layer's (older clusters are kept as they are).
    new_clusters : int, default 8
    offload : str, optional
        "cpu": after clustering, the clustered prompt K/V move to (pinned) host memory; the device keeps
        the sinks and generated tokens, and each step copies in only the selected tokens. Needs the
        hf decoder; generated tokens are then attended in full (not re-clustered).
    """

    budget: int | None = 1024
    sinks: int = 16
    tokens_per_cluster: int = 80
    iterations: int = 20
    fit_per_cluster: int = 10
    offload: str | None = None
    full_layers: int = 2
    recluster_every: int = 320
    new_clusters: int = 8

    name: ClassVar[str] = "clusterkv"
    caps: ClassVar[Capabilities] = Capabilities(per_step=True, per_head=True, evicts=False, reusable=False,
                                                question_agnostic=True)

    def __post_init__(self) -> None:
        if self.ratio is None and self.budget is None:
            self.budget = 1024
        super().__post_init__()
        for flag, value in (("--sinks", self.sinks), ("--full-layers", self.full_layers)):
            if value < 0:
                raise ChunkKVError(f"{flag} must be 0 or more, got {value}")
        if self.offload not in (None, "cpu"):
            raise ChunkKVError(f"--offload takes cpu, got {self.offload!r}")
        if min(self.tokens_per_cluster, self.iterations, self.recluster_every, self.new_clusters, self.fit_per_cluster) < 1:
            raise ChunkKVError(
                "clusterkv: tokens_per_cluster, iterations, fit_per_cluster, recluster_every and new_clusters must be >= 1"
            )

    def kept_tokens(self, kv_len: int) -> int:
        return kv_len  # nothing is evicted; the budget applies per decode step

    def select(self, query, key, layer_idx, n_layers, scaling):
        return None

    def decode_route(self, cache) -> "ClusterState":
        """Cluster the prefilled cache; the returned route makes each decode step attend to chosen clusters."""
        return ClusterState.build(self, cache)

    def step_budget(self, prompt_len: int) -> int:
        """Tokens attended per decode step: --budget, or --ratio of the prompt (1024 if neither is given)."""
        return self.budget if self.budget is not None else self.kept_tokens(prompt_len)


RESEEDS = 64


def kmeans_cosine(keys: torch.Tensor, n_clusters: int, iterations: int = 20, generator=None):
    """Spherical k-means, batched over the leading dims.

    keys: (batch, kv_heads, n, head_dim). Initial centroids are n_clusters evenly spaced tokens, or a
    random sample when `generator` is given. An empty cluster is re-seeded with the token worst served
    by its current centroid; during the first half of the iterations `split_merge` also moves one of
    the two most similar centroids onto the worst-served token when that token is further from its
    centroid than they are from each other (Lloyd alone keeps two seeds in one cluster). Returns unit centroids (batch, kv_heads, n_clusters, head_dim), float32,
    and assignments (batch, kv_heads, n) in [0, n_clusters).
    """
    b, h, n, d = keys.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    x = F.normalize(keys.float(), dim=-1)
    # Similarities in the keys' own precision (bf16 on a GPU: the (n, C) matrix dominates the time);
    # centroids are accumulated in float32.
    low = x.to(keys.dtype)
    if generator is None:
        start = torch.linspace(0, n - 1, n_clusters, device=keys.device).round().long().expand(b, h, -1)
    else:
        noise = torch.rand(b, h, n, generator=generator, device=generator.device).to(keys.device)
        start = noise.argsort(dim=-1)[..., :n_clusters]
    centroids = x.gather(2, start[..., None].expand(-1, -1, -1, d))
    for step in range(iterations):
        best, assign = cluster_kernels.nearest_centroids(low, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(2, assign[..., None].expand(-1, -1, -1, d), x)
        counts = torch.zeros(b, h, n_clusters, device=x.device).scatter_add_(2, assign, torch.ones_like(best))
        empty = counts == 0
        # The k-th empty cluster takes the k-th worst-served token (past RESEEDS per iteration they share
        # one, and split again later): a full top-n_clusters would cost more than the rest of the iteration.
        worst = best.topk(min(n_clusters, RESEEDS), dim=-1, largest=False).indices
        rank = (empty.long().cumsum(-1) - 1).clamp(0, worst.shape[-1] - 1)
        reseed = x.gather(2, worst.gather(2, rank)[..., None].expand(-1, -1, -1, d))
        centroids = torch.where(empty[..., None], reseed, F.normalize(sums, dim=-1))
        if step < iterations // 2:
            centroids = split_merge(centroids, x, best)
    return centroids, cluster_kernels.nearest_centroids(keys, centroids)[1]


def split_merge(centroids: torch.Tensor, x: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Move one centroid of the closest pair onto the worst-served token if that token is the lonelier.

    centroids: (batch, kv_heads, C, d); x: unit tokens (batch, kv_heads, n, d); best: each token's
    similarity to its centroid (batch, kv_heads, n). One move per (batch, kv_head) and call.
    """
    n_clusters, d = centroids.shape[-2:]
    if n_clusters < 2:
        return centroids
    pair = centroids @ centroids.transpose(-1, -2)
    pair.diagonal(dim1=-2, dim2=-1).fill_(-2.0)
    closest, flat = pair.flatten(-2).max(dim=-1)
    lonely, token = best.min(dim=-1)
    moved = (flat % n_clusters)[..., None, None]
    target = x.gather(2, token[..., None, None].expand(-1, -1, 1, d))
    swap = (lonely < closest)[..., None, None] & (torch.arange(n_clusters, device=x.device)[:, None] == moved)
    return torch.where(swap, target, centroids)


def members(assignments: torch.Tensor, n_clusters: int, first: int = 0):
    """CSR layout of the clusters: token positions sorted by cluster, and each cluster's start.

    assignments: (batch, kv_heads, n) for tokens first, first + 1, ... Returns order (batch, kv_heads, n)
    of absolute positions and offsets (batch, kv_heads, n_clusters + 1).
    """
    order = assignments.argsort(dim=-1, stable=True) + first
    counts = torch.zeros(*assignments.shape[:-1], n_clusters, dtype=torch.long, device=assignments.device)
    counts.scatter_add_(-1, assignments, torch.ones_like(assignments))
    return order, F.pad(counts.cumsum(-1), (1, 0))


def cluster_scores(query: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """q·centroid summed over the query heads of each KV group: (batch, kv_heads, n_clusters).

    query: (batch, q_heads, 1, head_dim). The paper selects per query head; summing over the group
    gives one selection per KV head, so the gathered K/V are shared by the group (as GQA stores them).
    """
    q = group_queries(query.float(), centroids.shape[1]).sum(dim=2)  # (b, kv_heads, 1, d)
    return (q @ centroids.float().transpose(-1, -2)).squeeze(-2)


def select_tokens(query, centroids, order, offsets, budget: int):
    """Positions of the members of the best clusters, best first, cut to `budget` exactly.

    query: (batch, q_heads, 1, head_dim); centroids: (batch, kv_heads, n_clusters, head_dim);
    order/offsets: the CSR layout from `members`. Returns (batch, kv_heads, min(budget, n_clustered)).
    """
    n_kept = min(budget, order.shape[-1])
    sizes = offsets.diff(dim=-1)
    ranked = cluster_scores(query, centroids).argsort(dim=-1, descending=True, stable=True)  # ties: lower index first
    ends = sizes.gather(-1, ranked).cumsum(-1)  # end of each ranked cluster in the concatenation
    slots = torch.arange(n_kept, device=order.device).expand(*order.shape[:-1], n_kept).contiguous()
    rank = torch.searchsorted(ends, slots, right=True)  # empty clusters are skipped
    within = slots - (ends.gather(-1, rank) - sizes.gather(-1, ranked.gather(-1, rank)))
    return order.gather(-1, offsets.gather(-1, ranked.gather(-1, rank)) + within)


@dataclass
class LayerClusters:
    """One layer's clusters: unit centroids (batch, kv_heads, C, d), members in CSR form, clustered span.

    Centroids are kept in the keys' precision: each decode step reads all of them to rank the clusters, and
    bf16 halves that read (k-means itself runs in float32)."""

    centroids: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    clustered_end: int  # tokens [sinks, clustered_end) are clustered; later ones are "recent"
    host: tuple[torch.Tensor, torch.Tensor] | None = None  # offloaded K/V of [sinks, clustered_end)

    def append(self, keys: torch.Tensor, n_clusters: int, iterations: int) -> None:
        """Cluster keys (the next tokens after clustered_end) and add their clusters."""
        centroids, assign = kmeans_cosine(keys, min(n_clusters, keys.shape[2]), iterations)
        order, offsets = members(assign, centroids.shape[2], self.clustered_end)
        self.centroids = torch.cat([self.centroids, centroids.to(self.centroids.dtype)], dim=2)
        self.order = torch.cat([self.order, order], dim=-1)
        self.offsets = torch.cat([self.offsets, offsets[..., 1:] + self.offsets[..., -1:]], dim=-1)
        self.clustered_end += keys.shape[2]


class ClusterState(Route):
    """Per-layer clusters of a prefilled cache; as a decode step's route, attends to the chosen clusters."""

    def __init__(self, compressor: ClusterKV, layers: list[LayerClusters | None], prompt_len: int, seconds: float = 0.0):
        self.compressor = compressor
        self.layers = layers
        self.budget = compressor.step_budget(prompt_len)
        self.seconds = seconds

    @classmethod
    @torch.inference_mode()
    def build(cls, compressor: ClusterKV, cache, max_stacked: int = 32) -> "ClusterState":
        """Cluster every layer's cached keys (after `full_layers`), sinks excluded.

        Centroids are fitted on a strided sample of each layer's keys, up to `max_stacked` (layer,
        sequence) pairs per k-means call; then each layer assigns all its keys in one pass.
        """
        start = time.perf_counter()
        n_layers = len(cache.layers)
        layers: list[LayerClusters | None] = [None] * n_layers
        # Sliding-window layers keep the model's window and are attended in full, as the first `full_layers` are.
        todo = [i for i in range(compressor.full_layers, n_layers) if not is_sliding(cache.layers[i])]
        batch = cache.layers[0].keys.shape[0] if cache.layers else 1
        group = max(1, max_stacked // batch)
        for first in range(0, len(todo), group):
            for layer_idx, state in zip(todo[first : first + group], _fit_layers(compressor, cache, todo[first : first + group])):
                layers[layer_idx] = state
        if cache.layers and cache.layers[-1].keys is not None and cache.layers[-1].keys.device.type == "cuda":
            torch.cuda.synchronize(cache.layers[-1].keys.device)
        full = [layer for layer in cache.layers if not is_sliding(layer)]
        prompt_len = full[0].keys.shape[2] if full else 0
        state = cls(compressor, layers, prompt_len, time.perf_counter() - start)
        if compressor.offload:
            state.offload(cache)
        return state

    @property
    def offloaded(self) -> bool:
        return any(layer is not None and layer.host is not None for layer in self.layers)

    def offload(self, cache) -> None:
        """Move each clustered layer's clustered K/V to host memory; the device cache keeps sinks + later tokens."""
        pin = torch.cuda.is_available()
        for layer_idx, state in enumerate(self.layers):
            if state is None:
                continue
            layer, sinks = cache.layers[layer_idx], self.sinks_of(state)
            host = []
            for states in (layer.keys, layer.values):
                part = states[:, :, sinks : state.clustered_end]
                host.append(torch.empty(part.shape, dtype=part.dtype, pin_memory=pin).copy_(part))
            state.host = tuple(host)
            layer.keys, layer.values = (
                torch.cat([t[:, :, :sinks], t[:, :, state.clustered_end :]], dim=2) for t in (layer.keys, layer.values)
            )

    def sinks_of(self, state: "LayerClusters") -> int:
        return min(self.compressor.sinks, state.clustered_end)

    def clusters(self, layer_idx: int) -> "LayerClusters | None":
        """This layer's clusters, or None for a layer attended in full."""
        return self.layers[layer_idx] if layer_idx < len(self.layers) else None

    def indices(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """Positions attended by this decode step: sinks + selected + recent, (batch, kv_heads, n)."""
        comp, state = self.compressor, self.clusters(layer_idx)
        if state is None:
            return None
        kv_len = key.shape[2]
        if kv_len - state.clustered_end > comp.recluster_every:
            end = state.clustered_end + comp.recluster_every
            state.append(key[:, :, state.clustered_end : end], comp.new_clusters, comp.iterations)
        room = max(0, self.budget - self.sinks_of(state) - (kv_len - state.clustered_end))
        head = self.sinks_and_chosen(state, query, room)
        recent = torch.arange(state.clustered_end, kv_len, device=key.device).expand(*head.shape[:-1], -1)
        return torch.cat([head, recent], dim=-1)

    def sinks_and_chosen(self, state: "LayerClusters", query: torch.Tensor, room: int) -> torch.Tensor:
        """The sink positions, then up to `room` members of the clusters best matching the query."""
        sinks, room = self.sinks_of(state), min(room, state.order.shape[-1])
        if cluster_kernels.available(query.device, query.shape[-1]):
            return cluster_kernels.select_clusters(query, state.centroids, state.order, state.offsets, sinks, room)
        chosen = select_tokens(query, state.centroids, state.order, state.offsets, room)
        sink_idx = torch.arange(sinks, device=query.device).expand(*chosen.shape[:-1], sinks)
        return torch.cat([sink_idx, chosen], dim=-1)

    def attend(self, layer_idx: int, query, key, value, scaling: float):
        """Exact softmax over the selected tokens; None means full attention for this layer.

        query: (batch, q_heads, 1, d); key/value: (batch, kv_heads, kv_len, d).
        Returns (batch, 1, q_heads, d) like transformers' attention functions.
        """
        if query.shape[2] != 1:
            return None
        state = self.clusters(layer_idx)
        if state is not None and state.host is not None:
            return self._attend_offloaded(state, query, key, value, scaling)
        idx = self.indices(layer_idx, query, key)
        if idx is None:
            return None
        return grouped_decode_attention(query, gather_tokens(key, idx), gather_tokens(value, idx), scaling)

    def _attend_offloaded(self, state: "LayerClusters", query, key, value, scaling: float):
        """key/value hold the sinks then every later token; the chosen clustered tokens come from host memory."""
        sinks = self.sinks_of(state)
        room = max(0, self.budget - key.shape[2])
        chosen = select_tokens(query, state.centroids, state.order, state.offsets, room)
        on_host = (chosen - sinks).cpu()
        recalled = [gather_tokens(t, on_host).to(key.device, non_blocking=True) for t in state.host]
        keys = torch.cat([key[:, :, :sinks], recalled[0], key[:, :, sinks:]], dim=2)
        values = torch.cat([value[:, :, :sinks], recalled[1], value[:, :, sinks:]], dim=2)
        return grouped_decode_attention(query, keys, values, scaling)

    def static_index(self, layer_idx: int, capacity: int) -> tuple[int, int, int] | None:
        """The fast decoder's selection: fixed shapes, so one CUDA graph serves every step.

        The layer's K/V sit in a static buffer of `capacity` slots. Every slot after the clustered
        prompt is attended (generated tokens are not re-clustered here), so fewer clusters are taken
        to keep sinks + clusters + those slots within the budget. Returns (sinks, room, tail_start): attend
        the sinks, `room` members of the best clusters, then the slots from tail_start on that are filled;
        None for a layer attended in full.
        """
        state = self.clusters(layer_idx)
        if state is None:
            return None
        sinks, tail_start = self.sinks_of(state), state.clustered_end
        room = min(max(0, self.budget - sinks - (capacity - tail_start)), state.order.shape[-1])
        return sinks, room, tail_start

    def static_attend(self, layer_idx: int, query, key, value, filled: torch.Tensor, scaling: float):
        """The fast decoder's attention: the static selection over static buffers whose first `filled` (batch,)
        slots hold tokens; None for a layer attended in full."""
        picked = self.static_index(layer_idx, key.shape[2])
        if picked is None:
            return None
        sinks, room, tail_start = picked
        state = self.clusters(layer_idx)
        lengths = filled + (sinks + room - tail_start)
        if cluster_kernels.available(query.device, query.shape[-1]):
            return cluster_kernels.cluster_attention(
                query, key, value, state.centroids, state.order, state.offsets, lengths, sinks, room, tail_start, scaling
            )
        index = self.sinks_and_chosen(state, query, room)
        key, value = (torch.cat([gather_tokens(t, index), t[:, :, tail_start:]], dim=2) for t in (key, value))
        mask = torch.arange(key.shape[2], device=key.device)[None, :] < lengths[:, None]
        return grouped_decode_attention(query, key, value, scaling, mask)


def _fit_layers(comp: ClusterKV, cache, layer_ids: list[int]) -> list[LayerClusters]:
    """Clusters for several layers of one cache: one k-means over their stacked samples, then assignment per layer."""
    keys = [cache.layers[i].keys for i in layer_ids]
    b, h, n, d = keys[0].shape
    sinks = min(comp.sinks, n)
    states = [
        LayerClusters(k.new_zeros(b, h, 0, d),
                      torch.zeros(b, h, 0, dtype=torch.long, device=k.device),
                      torch.zeros(b, h, 1, dtype=torch.long, device=k.device), sinks)
        for k in keys
    ]  # fmt: skip
    n_prompt = n - sinks
    if n_prompt == 0:
        return states
    n_clusters = math.ceil(n_prompt / comp.tokens_per_cluster)
    n_fit = min(n_prompt, n_clusters * comp.fit_per_cluster)
    picks = torch.linspace(sinks, n - 1, n_fit, device=keys[0].device).round().long()
    sample = torch.cat([k.index_select(2, picks) for k in keys], dim=0)  # (layers * b, h, n_fit, d)
    centroids, _ = kmeans_cosine(sample, n_clusters, comp.iterations)
    for state, key, fitted in zip(states, keys, centroids.split(b, dim=0)):
        assign = cluster_kernels.nearest_centroids(key[:, :, sinks:], fitted)[1]
        order, offsets = members(assign, n_clusters, sinks)
        state.centroids, state.order, state.offsets, state.clustered_end = fitted.to(key.dtype), order, offsets, n
    return states
