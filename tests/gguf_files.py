"""Tiny .gguf files written from a tiny transformers model with the `gguf` package (test support, no downloads).

The tensors get llama.cpp's names (gguf's own name map), the metadata the keys transformers' GGUF loader reads,
and a byte-level BPE vocabulary of the model's size, so `from_pretrained(gguf_file=...)` rebuilds the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# chunkkv family -> (gguf architecture, gguf's MODEL_ARCH member)
ARCHES = {"qwen3": ("qwen3", "QWEN3"), "phi3": ("phi3", "PHI3"), "gemma3_text": ("gemma3", "GEMMA3")}


def write_tiny_gguf(model, family: str, path: Path) -> Path:
    import gguf

    arch, member = ARCHES[family]
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{family}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    add_vocabulary(writer, config.vocab_size)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, member), config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        data = tensor.float().numpy()
        if family == "gemma3_text" and "norm" in base:
            data = data + 1  # llama.cpp stores Gemma's RMSNorm weights as 1 + w
        if base == "lm_head" and config.tie_word_embeddings:
            continue
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_vocabulary(writer, size: int) -> None:
    """A BPE vocabulary of `size` tokens: single characters, two merges, then end-of-text.

    (transformers 5.17's converter needs merges, and reads a one-element list as a bare string.)"""
    pairs = [(chr(0x100), chr(0x101)), (chr(0x102), chr(0x103))]
    tokens = [chr(0x100 + i) for i in range(size - 3)] + ["".join(p) for p in pairs] + ["<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (size - 1) + [3])
    writer.add_token_merges([" ".join(p) for p in pairs])
    writer.add_token_scores([0.0] * size)
    writer.add_eos_token_id(size - 1)
    writer.add_bos_token_id(size - 1)
    writer.add_pad_token_id(size - 1)
