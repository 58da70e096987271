"""Tiny random-weight models of every family chunkkv compresses, shaped like the shipped profiles.

Each keeps its profile's layout (sliding window pattern, experts, q/k norms, soft-capping, sinks) with small
sizes: a window of WINDOW tokens so test prompts run past it, and every family's layer pattern at least once.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

import chunkkv_cli.compress  # noqa: F401  (before the engine: compress's methods import the engine themselves)
from chunkkv_cli.profiles import Profile, load_profile

# One shipped profile per family (Mistral twice: with and without a sliding window).
FAMILY_PROFILES = {
    "llama": "llama3.2-3b", "mistral": "mistral-7b", "mistral_window": "mistral-7b-v0.1", "qwen2": "qwen2.5-7b",
    "qwen3": "qwen3-8b", "qwen3_moe": "qwen3-30b-a3b", "mixtral": "mixtral-8x7b", "phi3": "phi-3.5-mini",
    "gemma2": "gemma-2-9b", "gemma3_text": "gemma-3-4b", "gpt_oss": "gpt-oss-20b",
}  # fmt: skip
WINDOW = 8
SMALL_EXTRA = {"num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
               "query_pre_attn_scalar": 16}  # fmt: skip


def tiny_profile(name: str, **overrides) -> Profile:
    """The profile `name` with tiny sizes and the same layer layout (`overrides`: other profile fields)."""
    full = load_profile(name)
    layers = max(3, (full.full_every or 0) + 1)
    extra = {k: SMALL_EXTRA.get(k, v) for k, v in full.extra.items()}
    rope = full.rope_scaling
    if rope and rope.get("rope_type") == "llama3":
        rope = {**rope, "original_max_position_embeddings": 64}
    return Profile(**{**asdict(full), "num_layers": layers, "hidden_size": 64, "intermediate_size": 64,
                      "vocab_size": 128, "head_dim": 16, "num_attention_heads": 4, "num_kv_heads": 2,
                      "sliding_window": WINDOW if full.sliding_window else None, "extra": extra,
                      "rope_scaling": rope, "max_context": 4096, **overrides})  # fmt: skip


def tiny_family_model(family: str, attn_implementation=None, dtype=torch.float32, **overrides):
    """(model, reference): the family's tiny model under chunkkv's attention, and the same weights under eager."""
    from transformers import AutoModelForCausalLM

    from chunkkv_cli.engine import ATTENTION_NAME

    config = tiny_profile(FAMILY_PROFILES[family], **overrides).to_hf_config()
    config.pad_token_id = config.bos_token_id = config.eos_token_id = None  # the published ids lie past 128 tokens
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation or ATTENTION_NAME, dtype=dtype)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    reference.load_state_dict(model.state_dict())
    return model.eval(), reference.eval()
