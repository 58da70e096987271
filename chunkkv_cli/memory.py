"""KV-cache arithmetic: the ChunkKV paper's formula, the real (GQA) size, and what fits on a GPU.

Pure functions, no torch, so `chunkkv memory` starts instantly. Sizes in bytes; token counts in tokens.

Units: `parse_size` reads token counts with binary suffixes (32k = 32,768). `parse_bytes` reads memory
the way Kubernetes does: GB/G = 10^9 bytes, GiB/Gi = 2^30 bytes. "80GB" is therefore 80·10^9 bytes, a
slight under-estimate of an "80 GB" H100 (nvidia-smi reports 81,559 MiB ≈ 85.5·10^9 bytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.families import SLIDING

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
DEFAULT_RATIO = 0.1
DEFAULT_GPU_MEM = "80GB"
PAPER_DTYPE_BYTES = 2  # Eq. 1 of the ChunkKV paper counts fp16 values

_TOKEN_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2}
_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str | int, flag: str = "--seq") -> int:
    """A positive token count: 2048, 32k (32,768), 128K, 1M (1,048,576)."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
    value = int(match.group(1)) * _TOKEN_SUFFIXES[match.group(2).lower()] if match else 0
    if value < 1:
        raise ChunkKVError(f"{flag} '{text}' is not a token count: use a positive number like 2048, 32k or 1M")
    return value


def parse_bytes(text: str | int, flag: str = "--gpu-mem") -> int:
    """A positive memory size: 80GB (80·10^9), 80GiB (80·2^30), 141G (= 141GB), or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _BYTE_UNITS or float(match.group(1)) * _BYTE_UNITS[unit] < 1:
        raise ChunkKVError(f"{flag} '{text}' is not a memory size: use a positive size like 80GB, 80GiB or 141G")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ChunkKVError(f"--dtype '{dtype}' is not supported: use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def human_bytes(n_bytes: int) -> str:
    """1073741824 -> '1.00 GiB' (binary units, two decimals)."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def paper_kv_bytes(batch: int, seq: int, layers: int, attn_heads: int, head_dim: int) -> int:
    """ChunkKV paper, Eq. 1: 2 (K and V) · B · S · L · N · D · 2 bytes (fp16), N = attention heads.

    The paper counts every attention head; LLaMA-3-8B at B=1, S=2048 gives 1,073,741,824 bytes (1 GiB).
    """
    return 2 * batch * seq * layers * attn_heads * head_dim * PAPER_DTYPE_BYTES


def kv_bytes(batch: int, seq: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """The cache actually stored: K and V of shape (batch, kv_heads, seq, head_dim) in every layer."""
    return 2 * batch * seq * layers * kv_heads * head_dim * dtype_bytes


def check_ratio_budget(ratio: float | None, budget: int | None) -> None:
    if ratio is not None and not 0 < ratio <= 1:
        raise ChunkKVError(f"--ratio must be in (0, 1], got {ratio}")
    if budget is not None and budget < 1:
        raise ChunkKVError(f"--budget must be a positive number of tokens, got {budget}")


def kept_tokens(seq: int, ratio: float | None = None, budget: int | None = None) -> int:
    """Tokens each layer keeps: `budget` (capped at seq) if given, else round(ratio · seq), at least 1.

    The one rule for it: `Compressor.kept_tokens` calls this. With neither given the ratio is 0.1.
    """
    check_ratio_budget(ratio, budget)
    if budget is not None:
        return min(budget, seq)
    ratio = DEFAULT_RATIO if ratio is None else ratio
    return min(seq, max(1, round(ratio * seq)))


def max_batch(free_bytes: int, per_sequence_bytes: int) -> int:
    """How many sequences of `per_sequence_bytes` fit in `free_bytes` (0 when none does)."""
    return max(0, free_bytes) // per_sequence_bytes


def max_seq(free_bytes: int, bytes_for_seq: Callable[[int], int], limit: int = 2**40) -> int:
    """Longest seq with bytes_for_seq(seq) <= free_bytes (bytes_for_seq must not decrease); 0 if none."""
    low, high = 0, 1
    while high <= limit and bytes_for_seq(high) <= free_bytes:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if bytes_for_seq(middle) <= free_bytes else (low, middle)
    return low


def why_paper_differs(profile, dtype: str) -> str:
    """One sentence on why Eq. 1 and the stored cache differ for this model."""
    heads, kv_heads = profile.num_attention_heads, profile.num_kv_heads
    if heads == kv_heads:
        reason = f"{profile.name} has one KV head per attention head ({heads}), so the head counts agree"
    else:
        reason = (
            f"Eq. 1 counts all {heads} attention heads, but {profile.name} uses grouped-query attention "
            f"and stores only {kv_heads} KV heads ({heads // kv_heads}x fewer)"
        )
    if DTYPE_BYTES[dtype] != PAPER_DTYPE_BYTES:
        reason += f"; the paper assumes fp16 (2 bytes), here {dtype} ({DTYPE_BYTES[dtype]} bytes)"
    return reason + "."


@dataclass(frozen=True)
class CacheShape:
    """One model's KV cache at one dtype and compression: bytes as a function of batch, length and layers.

    `sliding` names the layers that keep a sliding window of `window` tokens (Gemma 2 and 3, GPT-OSS, Mistral
    with a window): the model caches their last window - 1 tokens, and chunkkv never compresses them. `layers`
    arguments are a count (the first n layers) or a range of layer indices.
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    ratio: float | None = None
    budget: int | None = None
    window: int | None = None
    sliding: frozenset = frozenset()

    def _split(self, layers) -> tuple[int, int]:
        """(full-attention layers, sliding layers) among `layers`."""
        indices = range(self.layers if layers is None else layers) if not isinstance(layers, range) else layers
        n_sliding = sum(1 for i in indices if i in self.sliding)
        return len(indices) - n_sliding, n_sliding

    def window_tokens(self, seq: int) -> int:
        return min(seq, self.window - 1) if self.window else seq

    def full(self, batch: int, seq: int, n_layers=None) -> int:
        n_full, n_sliding = self._split(n_layers)
        per_token = kv_bytes(batch, 1, 1, self.kv_heads, self.head_dim, self.dtype_bytes)
        return per_token * (n_full * seq + n_sliding * self.window_tokens(seq))

    def kept(self, seq: int) -> int:
        return kept_tokens(seq, self.ratio, self.budget)

    def compressed(self, batch: int, seq: int, n_layers=None) -> int:
        """Full-attention layers at `kept(seq)` tokens, sliding ones at their window."""
        n_full, n_sliding = self._split(n_layers)
        per_token = kv_bytes(batch, 1, 1, self.kv_heads, self.head_dim, self.dtype_bytes)
        return per_token * (n_full * self.kept(seq) + n_sliding * self.window_tokens(seq))

    def peak(self, batch: int, seq: int, n_layers=None) -> int:
        """The compressed prefill's peak: every layer but one at its compressed (or window) size, that one's whole prompt.

        A sliding layer also sees the whole prompt while it attends, so the extra is a full layer's either way.
        """
        n_full, n_sliding = self._split(n_layers)
        per_token = kv_bytes(batch, 1, 1, self.kv_heads, self.head_dim, self.dtype_bytes)
        smallest = self.kept(seq) if n_full else self.window_tokens(seq)
        return self.compressed(batch, seq, n_layers) + per_token * (seq - min(smallest, seq))


def memory_report(
    profile,
    seq: int | str,
    batch: int = 1,
    ratio: float | None = None,
    budget: int | None = None,
    dtype: str = "fp16",
    gpu_mem: str | int = DEFAULT_GPU_MEM,
    gpus: int = 1,
    prefill_block: int | None = None,
) -> dict:
    """Everything `chunkkv memory` shows, as a flat dict of ints, floats, strings and (per_gpu) a list.

    Limits "with compression" count the prefill peak: the cache is compressed layer by layer, so while
    the last layer is being compressed the other layers hold `kept` tokens and that layer all `seq`.
    Weights are counted at `dtype`. The `prefill_*` figures add the activations of a prefill run in blocks
    of `prefill_block` tokens (`Activations`; by default `AUTO_PREFILL_BLOCK`), every GPU holding them
    while its layers run. With `gpus` > 1 the layers, their weights and their KV are split as
    `layer_blocks` and `weight_split` say, `gpu_mem` is each GPU's memory, and every limit is that of
    the GPU that fills first.
    """
    seq = parse_size(seq)
    if batch < 1:
        raise ChunkKVError(f"--batch must be a positive number of sequences, got {batch}")
    check_ratio_budget(ratio, budget)
    if ratio is None and budget is None:
        ratio = DEFAULT_RATIO
    shape = cache_shape(profile, dtype, ratio, budget)
    gpu_bytes = parse_bytes(gpu_mem)
    blocks = layer_blocks(profile.num_layers, gpus)
    if prefill_block is not None and prefill_block < 1:
        raise ChunkKVError(f"--prefill-block must be a positive number of tokens, got {prefill_block}")
    report = cache_report(profile, shape, seq, batch, dtype, gpu_bytes)
    acts = Activations.of_profile(profile, dtype)
    activations = lambda b, s: acts.bytes(b, s, prefill_block_for(s, prefill_block))  # noqa: E731
    fits = fit_report(shape, seq, batch, blocks, weight_split(profile, dtype, blocks), gpu_bytes, activations)
    extra = {"prefill_block": prefill_block_for(seq, prefill_block), "activation_bytes": activations(batch, seq),
             "prefill_peak_bytes": max(share["prefill_peak_bytes"] for share in fits["per_gpu"])}  # fmt: skip
    return {**report, **fits, **extra}


def cache_shape(profile, dtype: str, ratio: float | None = None, budget: int | None = None) -> CacheShape:
    """The profile's cache: its sliding-window layers (from `profile.layer_types()`) counted at their window."""
    sliding = frozenset(i for i, kind in enumerate(profile.layer_types()) if kind == SLIDING)
    return CacheShape(profile.num_layers, profile.num_kv_heads, profile.head_dim, dtype_bytes(dtype), ratio, budget,
                      profile.sliding_window if sliding else None, sliding)  # fmt: skip


def cache_report(profile, shape: CacheShape, seq: int, batch: int, dtype: str, gpu_bytes: int) -> dict:
    """The cache's size at `seq` tokens: the paper's formula, as stored, compressed, and the weights beside it."""
    gqa, n_kept = shape.full(batch, seq), shape.kept(seq)
    compressed = shape.compressed(batch, seq)
    return {
        "model": profile.name, "hf_id": profile.hf_id, "seq": seq, "batch": batch,
        "ratio": None if shape.budget is not None else shape.ratio, "budget": shape.budget, "dtype": dtype,
        "gpu_mem_bytes": gpu_bytes, "num_layers": shape.layers, "num_attention_heads": profile.num_attention_heads,
        "num_kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "max_context": profile.max_context,
        "paper_bytes": paper_kv_bytes(batch, seq, shape.layers, profile.num_attention_heads, shape.head_dim),
        "gqa_bytes": gqa, "why_paper_differs": why_paper_differs(profile, dtype),
        "kv_bytes_per_token": shape.full(1, 1), "kept_tokens": n_kept, "compressed_bytes": compressed,
        "saved_bytes": gqa - compressed, "saved_fraction": round(1 - compressed / gqa, 6),
        "compressed_peak_bytes": shape.peak(batch, seq), "param_count": profile.param_count(),
        "weight_bytes": profile.weight_bytes(dtype), "full_attention_layers": shape.layers - len(shape.sliding),
        "sliding_layers": len(shape.sliding), "sliding_window": shape.window,
    }  # fmt: skip


def fit_report(
    shape: CacheShape, seq: int, batch: int, blocks: list[range], weights: list[int], gpu_bytes: int,
    activations: Callable[[int, int], int] = lambda batch, seq: 0,
) -> dict:
    """What fits beside the weights: per GPU, and the batch and length limits of the GPU that fills first.

    `activations(batch, seq)`: what a prefill holds beside weights and cache, on every GPU while its layers run.
    """
    frees = [gpu_bytes - w for w in weights]

    def limit(bytes_for: Callable[[int, int, range], int]) -> Callable[[int], int]:
        """Bytes over the limit on the GPU that fills first, as a function of the prompt length."""
        return lambda s: max(bytes_for(batch, s, b) - free for b, free in zip(blocks, frees))

    def prefill(b: int, s: int, layers) -> int:
        return shape.peak(b, s, layers) + activations(b, s)

    per_gpu = [
        gpu_share(index, block, w, gpu_bytes, shape.full(batch, seq, block),
                  shape.compressed(batch, seq, block), shape.peak(batch, seq, block))
        | prefill_share(w, gpu_bytes, prefill(batch, seq, block),
                        max_seq(gpu_bytes - w, lambda s, layers=block: prefill(batch, s, layers)))
        for index, (block, w) in enumerate(zip(blocks, weights))
    ]  # fmt: skip
    return {
        "free_bytes": sum(frees),
        "gpus": len(blocks),
        "fits_full": all(share["fits_full"] for share in per_gpu),
        "fits_compressed": all(share["fits_compressed"] for share in per_gpu),
        "max_batch_full": min(max_batch(f, shape.full(1, seq, b)) for b, f in zip(blocks, frees)),
        "max_batch_compressed": min(max_batch(f, shape.peak(1, seq, b)) for b, f in zip(blocks, frees)),
        "max_seq_full": max_seq(0, limit(shape.full)),
        "max_seq_compressed": max_seq(0, limit(shape.peak)),
        "fits_prefill": all(share["fits_prefill"] for share in per_gpu),
        "max_batch_prefill": min(max_batch(f, prefill(1, seq, b)) for b, f in zip(blocks, frees)),
        "max_seq_prefill": min(share["max_seq_prefill"] for share in per_gpu),
        "per_gpu": per_gpu,
    }


def prefill_share(weights: int, gpu_bytes: int, prefill_bytes: int, longest: int) -> dict:
    """One GPU's prefill: weights + cache at its prefill peak + activations, and the longest prompt that fits."""
    return {
        "prefill_peak_bytes": weights + prefill_bytes,
        "fits_prefill": weights + prefill_bytes <= gpu_bytes,
        "max_seq_prefill": longest,
    }


def layer_blocks(n_layers: int, gpus: int) -> list[range]:
    """Each GPU's layers: contiguous blocks in order, equal in size, the first `n_layers % gpus` one layer larger."""
    if gpus < 1:
        raise ChunkKVError(f"--gpus must be a positive number of GPUs, got {gpus}")
    if gpus > n_layers:
        raise ChunkKVError(f"--gpus {gpus} is more GPUs than the model's {n_layers} layers: use at most {n_layers}")
    size, larger = divmod(n_layers, gpus)
    starts = [index * size + min(index, larger) for index in range(gpus + 1)]
    return [range(start, stop) for start, stop in zip(starts, starts[1:])]


def weight_split(profile, dtype: str, blocks: list[range]) -> list[int]:
    """Weight bytes on each GPU: its layers; the embeddings on the first GPU; the final norm and lm_head on the last.

    A tied lm_head is the embedding matrix, so it adds nothing (it stays with the embeddings).
    """
    embeddings = profile.vocab_size * profile.hidden_size
    lm_head = 0 if profile.tie_word_embeddings else embeddings
    final_norm = profile.hidden_size
    per_layer = (profile.param_count() - embeddings - lm_head - final_norm) // profile.num_layers
    params = [per_layer * len(block) for block in blocks]
    params[0] += embeddings
    params[-1] += final_norm + lm_head
    return [n * dtype_bytes(dtype) for n in params]


def gpu_share(
    index: int, block: range, weights: int, gpu_bytes: int, full: int, compressed: int, compressed_peak: int
) -> dict:
    """One GPU's row of `memory --gpus`: its layers, weights and KV, and whether each cache fits beside them."""
    return {
        "gpu": index,
        "first_layer": block.start,
        "last_layer": block.stop - 1,
        "weight_bytes": weights,
        "full_kv_bytes": full,
        "compressed_kv_bytes": compressed,
        "compressed_peak_bytes": compressed_peak,
        "free_bytes": gpu_bytes - weights,
        "fits_full": weights + full <= gpu_bytes,
        "fits_compressed": weights + compressed_peak <= gpu_bytes,
    }


AUTO_PREFILL_BLOCK = 8192  # tokens: the GEMMs are as fast as over the whole sequence, the MLP's scratch under 1 GiB
MIN_PREFILL_BLOCK = 256
PREFILL_BLOCK_STEP = 256


@dataclass(frozen=True)
class Activations:
    """What a blocked prefill holds beside the weights and the cache (`generate.prefill` with a block size).

    For the whole sequence: the hidden state (one copy, written over block by block) and RoPE's cos and sin.
    For one block, at its peak inside the MLP: act(gate), up and their product beside the block's residual
    and normed input. At each layer's last block the window's queries score every key: their logits and
    probabilities (window-scoring methods; all-query methods such as H2O hold the layer's queries too).
    """

    hidden: int
    intermediate: int
    q_heads: int
    head_dim: int
    dtype_bytes: int
    window: int = 32

    @classmethod
    def of_profile(cls, profile, dtype: str, window: int = 32) -> "Activations":
        return cls(profile.hidden_size, profile.intermediate_size, profile.num_attention_heads, profile.head_dim,
                   dtype_bytes(dtype), window)  # fmt: skip

    def bytes(self, batch: int, seq: int, block: int) -> int:
        block = min(block, seq)
        sequence = seq * (self.hidden + 2 * self.head_dim)
        one_block = block * (3 * self.intermediate + 2 * self.hidden)
        scoring = 2 * self.q_heads * min(self.window, seq) * seq
        return batch * (sequence + one_block + scoring) * self.dtype_bytes


def prefill_block_for(seq: int, block: int | None) -> int:
    """The block a prefill of `seq` tokens runs at: `block`, else the automatic size; never more than `seq`."""
    return min(seq, AUTO_PREFILL_BLOCK if block is None else block)


def largest_block(seq: int, fits: Callable[[int], bool], limit: int | None = None) -> int:
    """Largest block (a multiple of PREFILL_BLOCK_STEP, or `seq` itself) up to `limit` for which `fits`; 0 if none."""
    top = min(seq, limit or seq)
    candidates = [top] + list(range(top // PREFILL_BLOCK_STEP * PREFILL_BLOCK_STEP, 0, -PREFILL_BLOCK_STEP))
    return next((b for b in candidates if b >= min(seq, MIN_PREFILL_BLOCK) and fits(b)), 0)


def prefill_peak(profile, dtype: str, seq: int, block: int | None = None, batch: int = 1, ratio: float | None = None,
                 budget: int | None = None, window: int = 32) -> int:
    """Predicted peak of a blocked prefill: weights, the cache at its prefill peak, and `Activations` at the block."""
    shape = CacheShape(profile.num_layers, profile.num_kv_heads, profile.head_dim, dtype_bytes(dtype), ratio, budget)
    acts = Activations.of_profile(profile, dtype, window)
    return profile.weight_bytes(dtype) + shape.peak(batch, seq) + acts.bytes(batch, seq, prefill_block_for(seq, block))
