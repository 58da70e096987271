"""The model families chunkkv compresses: how each one's config is built, counted and laid out in layers.

Torch-free (read by `memory` and `profiles`). A family is a transformers `model_type` whose attention is the
usual one (queries, keys and values per head, RoPE, a KV cache per layer); what differs is recorded here:
which layers use a sliding window, what the parameter count adds (experts, q/k norms, attention sinks,
extra norms), and which config class and GGUF architecture name it has.
"""

from __future__ import annotations

from dataclasses import dataclass

from chunkkv_cli.errors import ChunkKVError

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    """What chunkkv needs to know about one transformers `model_type`."""

    config_class: str
    norms_per_layer: int = 2  # Gemma 2 and 3 also normalise before and after the MLP
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's q and k (head_dim weights each)
    sinks: bool = False  # GPT-OSS: one learned attention-sink logit per query head
    bias: str = "config"  # "config": q/k/v/o biases follow attention_bias; "qkv": always on q/k/v only; "none"
    layer_types_key: bool = False  # the config takes `layer_types` (else a sliding window covers every layer)
    experts: str | None = None  # "mixtral", "qwen3_moe" or "gpt_oss": how its expert MLP is counted
    gguf_arch: str | None = None  # the architecture name in a .gguf file's metadata
    full_every: int | None = None  # every N-th layer is full when a window is set (what a .gguf file leaves unsaid)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", gguf_arch="llama"),
    "mistral": Family("MistralConfig", bias="none", gguf_arch="mistral"),
    "qwen2": Family("Qwen2Config", bias="qkv", gguf_arch="qwen2"),
    "qwen3": Family("Qwen3Config", qk_norm=True, layer_types_key=True, gguf_arch="qwen3"),
    "qwen3_moe": Family("Qwen3MoeConfig", qk_norm=True, layer_types_key=True, experts="qwen3_moe", gguf_arch="qwen3moe"),
    "mixtral": Family("MixtralConfig", bias="none", experts="mixtral"),
    "phi3": Family("Phi3Config", bias="none", gguf_arch="phi3"),
    "gemma2": Family("Gemma2Config", norms_per_layer=4, layer_types_key=True, gguf_arch="gemma2", full_every=2),
    "gemma3_text": Family("Gemma3TextConfig", norms_per_layer=4, qk_norm=True, layer_types_key=True, gguf_arch="gemma3", full_every=6),
    "gpt_oss": Family("GptOssConfig", sinks=True, layer_types_key=True, experts="gpt_oss", gguf_arch="gpt-oss", full_every=2),
}

# Model types that have no per-layer KV cache of softmax attention to compress, named in the refusal.
NOT_COMPRESSIBLE = {
    "t5": "an encoder-decoder", "bart": "an encoder-decoder", "mt5": "an encoder-decoder", "whisper": "an encoder-decoder",
    "mamba": "a state-space model", "mamba2": "a state-space model", "falcon_mamba": "a state-space model",
    "rwkv": "a linear-attention (RNN) model", "recurrent_gemma": "a linear-recurrence model",
    "jamba": "a hybrid state-space model", "zamba": "a hybrid state-space model", "bamba": "a hybrid state-space model",
}  # fmt: skip


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ChunkKVError(unsupported_message(name))
    return FAMILIES[name]


def unsupported_message(model_type: str | None) -> str:
    """One line naming what the model is (when known) and the families chunkkv compresses."""
    kind = NOT_COMPRESSIBLE.get(str(model_type))
    what = f"'{model_type}' is {kind}, with no attention KV cache to compress" if kind else f"'{model_type}' is not supported"
    return f"model type {what}; chunkkv compresses decoder-only attention models: {', '.join(FAMILIES)}"


def layer_types(num_layers: int, sliding_window: int | None, full_every: int | None) -> list[str]:
    """Each layer's attention: with a sliding window, layers (i+1) % full_every == 0 are full, the rest sliding
    (Gemma 2 and GPT-OSS alternate, Gemma 3 has five sliding per full); no `full_every`: every layer slides."""
    if sliding_window is None:
        return [FULL] * num_layers
    if full_every is None:
        return [SLIDING] * num_layers
    return [FULL if (i + 1) % full_every == 0 else SLIDING for i in range(num_layers)]


def attention_params(fam: Family, hidden: int, q_dim: int, kv_dim: int, head_dim: int, heads: int, bias: bool) -> int:
    """One layer's attention weights: q/k/v/o, their biases, q/k norms, sinks."""
    count = 2 * hidden * q_dim + 2 * hidden * kv_dim
    if fam.bias == "qkv" or (fam.bias == "config" and bias):
        count += q_dim + 2 * kv_dim + (hidden if fam.bias == "config" else 0)
    count += 2 * head_dim if fam.qk_norm else 0
    return count + (heads if fam.sinks else 0)


def mlp_params(fam: Family, hidden: int, intermediate: int, extra: dict) -> int:
    """One layer's MLP: gate/up/down, or the router and every expert."""
    if fam.experts is None:
        return 3 * hidden * intermediate
    n_experts = int(extra.get("num_experts", extra.get("num_local_experts", 0)))
    if fam.experts == "qwen3_moe":
        return hidden * n_experts + n_experts * 3 * hidden * int(extra["moe_intermediate_size"])
    if fam.experts == "gpt_oss":  # every projection has a bias, the router too
        return hidden * n_experts + n_experts + n_experts * (3 * hidden * intermediate + 2 * intermediate + hidden)
    return hidden * n_experts + n_experts * 3 * hidden * intermediate
