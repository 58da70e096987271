"""Loading a model and tokenizer: embedded GGUF (converted once and cached), local HF folder, or random weights."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.profiles import Profile, embedded_gguf_path, load_profile

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Loaded:
    model: Any
    tokenizer: Any  # None for random weights
    profile: Profile
    device: Any


def cache_dir() -> Path:
    root = os.environ.get("CHUNKKV_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chunkkv"
    return Path(root)


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ChunkKVError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ChunkKVError("--device cuda was asked for but no CUDA GPU is visible")
    return torch.device(device)


def placement(device: str = "auto"):
    """(the device inputs start on, from_pretrained's device_map).

    `auto` with several GPUs visible spreads the layers over all of them (accelerate's device_map="auto");
    each layer then compresses its KV on its own device.
    """
    import torch

    torch_device = resolve_device(device)
    if device == "auto" and torch.cuda.device_count() > 1:
        return torch_device, "auto"
    return torch_device, {"": torch_device} if torch_device.type == "cuda" else None


def resolve_dtype(dtype: str | None, device):
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ChunkKVError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, DTYPES[dtype])


def load_model(
    spec: str,
    device: str = "auto",
    dtype: str | None = None,
    random_weights: bool = False,
    trust_remote_code: bool = False,
    allow_random: bool = False,
) -> Loaded:
    """Model + tokenizer for a profile name or path, with the compressing attention installed.

    A profile without weights builds random ones only with `random_weights` or `allow_random` (bench);
    anywhere else that would answer with noise, after allocating the full model.
    """
    profile = load_profile(spec)
    if profile.weights == "none" and not (random_weights or allow_random):
        raise ChunkKVError(no_weights_message(profile))
    torch_device, device_map = placement(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if random_weights or profile.weights == "none":
        return Loaded(build_random_model(profile, torch_device, torch_dtype), None, profile, torch_device)
    folder = weights_folder(profile)
    check_safetensors(folder)
    model, tokenizer = _from_folder(folder, torch_device, torch_dtype, trust_remote_code, device_map)
    return Loaded(model, tokenizer, profile, torch_device)


def no_weights_message(profile: Profile) -> str:
    local = f"~/models/{profile.hf_id.rsplit('/', 1)[-1]}"
    return (
        f"profile {profile.name} names no local weights (it holds {profile.hf_id}'s shape only) and chunkkv downloads "
        f"nothing: give --model a local Hugging Face folder or .gguf file, e.g. --model {local}"
    )


# Formats torch.load reads by unpickling, which can run code hidden in the file.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(folder: Path) -> None:
    """Weights load from safetensors only; a folder with pickle files alone is refused by name."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ChunkKVError(
            f"{folder} holds pickle weights ({pickles[0]}), which can run code when loaded; chunkkv loads "
            "safetensors only: convert them (e.g. save_pretrained(..., safe_serialization=True)) and retry"
        )
    raise ChunkKVError(f"no *.safetensors weights in {folder}")


def weights_folder(profile: Profile) -> Path:
    """A Hugging Face folder with the profile's weights; GGUF files are converted once into the cache."""
    source = embedded_gguf_path() if profile.weights == "embedded" else Path(profile.weights).expanduser()
    if not source.exists():
        raise ChunkKVError(f"weights for {profile.name} not found at {source}")
    if source.is_dir():
        return source
    if source.suffix != ".gguf":
        raise ChunkKVError(f"weights must be a Hugging Face folder or a .gguf file, got {source}")
    return converted_gguf(source)


# In the converted folder's name, so a folder from an earlier layout (fp32, before v2) is never taken for this one.
CONVERTED_LAYOUT = "fp16-v2"


def converted_gguf(gguf_file: Path) -> Path:
    """Dequantise a GGUF once into fp16 safetensors under the cache dir; later loads skip the conversion.

    fp16, not bf16: the dequantised values (4-bit codes times fp16 scales) keep 3 more mantissa bits.
    """
    target = cache_dir() / f"{gguf_file.stem}-{gguf_file.stat().st_size}-{CONVERTED_LAYOUT}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True)
    # The weights are dequantised in memory; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.float16)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def _from_folder(folder: Path, device, dtype, trust_remote_code: bool, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    from chunkkv_cli.engine import ATTENTION_NAME

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            attn_implementation=ATTENTION_NAME,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            device_map=device_map,
            **window_override(folder),
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ChunkKVError(f"cannot load the model in {folder}: {str(err).splitlines()[0]}") from err
    return (model if device_map == "auto" else model.to(device)).eval(), tokenizer


def window_override(folder: Path) -> dict:
    """Config overrides for loading: a sliding window at least as long as the context slides over nothing.

    Phi-3.5 publishes a 262144-token window beside a 131072-token context; loaded as written, transformers
    would make every layer a sliding one, which chunkkv never compresses. As full attention it is the same model.
    """
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    window, context = config.get("sliding_window"), config.get("max_position_embeddings")
    covers = isinstance(window, int) and isinstance(context, int) and window >= context
    return {"sliding_window": None} if covers and not config.get("layer_types") else {}


def build_random_model(profile: Profile, device, dtype, **overrides):
    """The profile's architecture with random weights, built directly on `device` (no weight files)."""
    import torch
    from transformers import AutoModelForCausalLM

    from chunkkv_cli.engine import ATTENTION_NAME

    config = profile.to_hf_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION_NAME)
    return model.eval()


def measure_kv_bytes(profile: Profile, seq: int, batch: int, dtype: str, ratio=None, budget=None) -> dict:
    """Prefill random tokens through a model with the profile's attention shape and count cache bytes.

    The hidden and MLP sizes are shrunk (KV bytes depend only on layers, KV heads, head dim, length
    and dtype), so this runs quickly; on CPU the sequence is capped at 1024 tokens.
    """
    import torch

    from chunkkv_cli.compress import make_compressor
    from chunkkv_cli.generate import cache_bytes, new_target, prefill

    if dtype not in DTYPES:
        raise ChunkKVError(f"--measure runs the model, so --dtype must be one of {', '.join(DTYPES)}")
    device = resolve_device("auto")
    measured_seq = seq if device.type == "cuda" else min(seq, 1024)
    model = build_random_model(
        profile, device, resolve_dtype(dtype, device), hidden_size=256, intermediate_size=256, vocab_size=256
    )
    ids = torch.randint(0, 256, (batch, measured_seq), device=device)
    full, compressed = new_target(model, make_compressor("fullkv")), new_target(
        model, make_compressor("chunkkv", ratio=ratio, budget=budget)
    )
    prefill(model, ids, [full, compressed])
    note = "real attention shape, reduced hidden size" + (
        f"; CPU: sequence capped at {measured_seq}" if measured_seq != seq else ""
    )
    return {
        "device": str(device),
        "seq": measured_seq,
        "full_bytes": cache_bytes(full.cache),
        "compressed_bytes": cache_bytes(compressed.cache),
        "note": note,
    }
