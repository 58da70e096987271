"""GGUF files of the families transformers' GGUF loader reads (Qwen3, Phi-3, Gemma 3): profile, weights, compression."""

from __future__ import annotations

import pytest
import torch

from chunkkv_cli.compress import make_compressor
from chunkkv_cli.generate import decode, kept_lengths, new_target, prefill
from chunkkv_cli.model import load_model
from chunkkv_cli.profiles import load_profile
from tests.families import WINDOW, tiny_family_model
from tests.gguf_files import write_tiny_gguf

pytest.importorskip("gguf")

# What transformers' GGUF loader leaves at its defaults, set to those defaults in the tiny model: Qwen3's
# head_dim (128: the loader does not read key_length), Gemma 3's query scale (256) and plain RoPE.
LOADER_DEFAULTS = {
    "qwen3": {"head_dim": 128},
    "phi3": {},
    "gemma3_text": {"rope_scaling": None, "extra": {"query_pre_attn_scalar": 256, "rope_local_base_freq": 10000.0}},
}


@pytest.mark.parametrize("family", list(LOADER_DEFAULTS))
def test_gguf_file_loads_as_the_same_model_and_compresses(family, tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKKV_CACHE", str(tmp_path / "cache"))
    model, _ = tiny_family_model(family, **LOADER_DEFAULTS[family])
    path = write_tiny_gguf(model, family, tmp_path / f"tiny-{family}.gguf")
    profile = load_profile(str(path))
    assert (profile.family, profile.num_layers, profile.num_kv_heads) == (family, model.config.num_hidden_layers, 2)
    assert profile.layer_types() == list(getattr(model.config, "layer_types", None) or profile.layer_types())
    loaded = load_model(str(path), "cpu", "fp32")
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, model(ids).logits, atol=5e-3)  # fp16 on the way through
    target = new_target(loaded.model, make_compressor("snapkv", ratio=0.5, window=4))
    pre = prefill(loaded.model, ids, [target])
    sliding = profile.sliding_window is not None
    assert kept_lengths(target.cache) == [WINDOW - 1 if sliding and kind == "sliding_attention" else 12
                                          for kind in profile.layer_types()]  # fmt: skip
    assert decode(loaded.model, target.cache, pre.logits, 24, 3, decoder="hf").shape == (1, 3)
