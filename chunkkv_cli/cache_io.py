"""`.ckv` files: a compressed prefix cache in one safetensors file, with JSON metadata; never pickle.

Tensors: ``layer.{i}.keys`` and ``layer.{i}.values`` (1, kv_heads, n_kept, head_dim) and ``layer.{i}.positions``
(the kept tokens' original positions, (1, n_kept) or (1, kv_heads, n_kept)). Since format version 2, a cache
whose KV heads keep lengths of their own (kvzip budget_shape=heads) stores each layer packed: keys and values
(total, head_dim), heads one after another, positions (total,), and ``layer.{i}.head_lengths`` (kv_heads,);
version 1 files (no packed layers) still load. The safetensors header's
``chunkkv`` entry holds the metadata JSON: format version, the model's identity (profile name, sha256 of its
config, of a sample of its weights and of its tokenizer), method and parameters, the document's sha256,
the prefix length, creation time, chunkkv version, and a sha256 over the metadata and every tensor's bytes
(safetensors has no checksum of its own, so a flipped byte in the data would otherwise load silently).
Files are written to a temporary name in the target folder, fsynced and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

import torch

from chunkkv_cli import __version__
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.outputs import TEMP_SUFFIX, temp_prefix
from chunkkv_cli.reuse import CompressedPrefix

FORMAT = "chunkkv-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added per-head packed layers; a version 1 file is a version 2 file without them
SUFFIX = ".ckv"
META_KEY = "chunkkv"
# Config keys that change with the loading path, dtype or library version, not with the model.
VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "name_or_path", "_model_name_or_path", "_commit_hash",
    "dtype", "torch_dtype", "_attn_implementation", "attn_implementation", "_attn_implementation_autoset",
    "use_cache", "architectures",
}  # fmt: skip
_PROBE = "".join(map(chr, range(32, 127))) + " héllo wörld 你好 \n\t"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_hash(config) -> str:
    """sha256 of the model config's JSON without the keys that do not change the model."""
    data = {k: v for k, v in json.loads(config.to_json_string()).items() if k not in VOLATILE_CONFIG_KEYS}
    return _sha256(json.dumps(data, sort_keys=True).encode())


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the sorted vocabulary and the chat template (both shape the prompt the cache continues)."""
    if hasattr(tokenizer, "get_vocab"):
        vocab = sorted(tokenizer.get_vocab().items())
    else:  # a tokenizer without a vocabulary listing: its encoding of a fixed probe text
        vocab = [type(tokenizer).__name__, tokenizer(_PROBE)["input_ids"]]
    template = getattr(tokenizer, "chat_template", None)
    return _sha256(json.dumps([vocab, template], sort_keys=True, ensure_ascii=False).encode())


def weights_hash(model, samples: int = 256) -> str:
    """sha256 of `samples` evenly spaced values of every parameter, rounded to bf16.

    Catches a cache used with another checkpoint of the same architecture (a fine-tune); rounding to bf16
    makes fp32 and bf16 loads of one checkpoint agree.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        flat = param.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples].to("cpu", torch.bfloat16)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(picked.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def model_identity(loaded, spec: str) -> dict:
    """What a cache must share with the model that answers from it; `spec` is the --model given to compress."""
    path = Path(spec).expanduser()
    return {
        "name": loaded.profile.name,
        "spec": str(path.resolve()) if path.exists() else spec,
        "config_sha256": config_hash(loaded.model.config),
        "weights_sha256": weights_hash(loaded.model),
        "tokenizer_sha256": tokenizer_hash(loaded.tokenizer),
    }


def method_meta(compressor, reuse_layers: int) -> dict:
    params = {f.name: getattr(compressor, f.name) for f in fields(compressor) if f.init}
    return {
        "name": compressor.name,
        "params": params,
        "reuse_layers": reuse_layers,
        "scoring": _scoring_note(compressor),
    }


def _scoring_note(compressor) -> str:
    if compressor.caps.own_pass:
        return f"question-agnostic: scored by a pass of its own over the prefilled prefix ({compressor.pass_request!r})"
    return ("question-agnostic: the observation window is the last `window` tokens of the prefix "
            "(the document's tail, </document> and 'Question:')")  # fmt: skip


def make_meta(identity: dict, method: dict, document: str, prefix: CompressedPrefix, source: str) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "chunkkv_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {**identity, "dtype": str(prefix.keys[0].dtype).removeprefix("torch.")},
        "method": method,
        "document": {"source": source, "sha256": _sha256(document.encode()), "chars": len(document)},
        "prefix_tokens": prefix.prefix_len,
        "layers": len(prefix.keys),
        "full_kv_bytes": prefix.full_bytes,
    }


def _tensors(prefix: CompressedPrefix) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, (k, v, p) in enumerate(zip(prefix.keys, prefix.values, prefix.positions)):
        tensors[f"layer.{i}.keys"] = k.detach().to("cpu").contiguous()
        tensors[f"layer.{i}.values"] = v.detach().to("cpu").contiguous()
        tensors[f"layer.{i}.positions"] = p.detach().to("cpu", torch.int64).contiguous()
        if prefix.head_lengths is not None:
            tensors[f"layer.{i}.head_lengths"] = torch.tensor(prefix.head_lengths[i], dtype=torch.int64)
    return tensors


def content_digest(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the metadata (without its digest) and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save(path: str | Path, prefix: CompressedPrefix, meta: dict) -> int:
    """Write the `.ckv` atomically (temp file in the same folder, fsync, rename); returns its size in bytes."""
    path = Path(path)
    tensors = _tensors(prefix)
    meta = {**meta, "digest": content_digest(meta, tensors)}
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    except OSError as err:
        raise ChunkKVError(f"cannot write in {path.parent}: {err.strerror or err}") from err
    os.close(fd)
    try:
        _write(tmp, tensors, meta)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise ChunkKVError(f"cannot write {path}: {err.strerror or err}") from err
        raise
    _fsync_folder(path.parent)
    return path.stat().st_size


def _write(tmp: str, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
    with open(tmp, "rb+") as file:
        os.fsync(file.fileno())


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the rename itself is already atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read(path: str | Path) -> tuple[dict, CompressedPrefix]:
    """Metadata and the compressed prefix (CPU tensors) of a `.ckv`, checked for damage and format version.

    Every problem is a one-line ChunkKVError; nothing from the file is executed (safetensors + JSON only).
    """
    path = Path(path)
    if not path.is_file():
        raise ChunkKVError(f"cache file not found: {path}" if not path.exists() else f"{path} is not a file")
    meta, tensors = _read_file(path)
    _check_format(meta, path)
    if meta.get("digest") != content_digest(meta, tensors):
        raise ChunkKVError(f"{path} is corrupt (its checksum does not match its contents); compress the document again")
    return meta, _prefix(meta, tensors, path)


def _read_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as err:  # safetensors raises its own error, OSError, ... for damaged or foreign files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ChunkKVError(f"{path} is corrupt or truncated, or not a chunkkv cache ({reason})") from None
    if META_KEY not in header:
        raise ChunkKVError(f"{path} is a safetensors file but not a chunkkv cache (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError:
        raise ChunkKVError(f"{path} is corrupt: its metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ChunkKVError(f"{path} is corrupt: its metadata is not a JSON object")
    return meta, tensors


def _check_format(meta: dict, path: Path) -> None:
    if meta.get("format") != FORMAT:
        raise ChunkKVError(f"{path} is corrupt or not a chunkkv cache (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = "upgrade chunkkv" if newer else "compress the document again"
        raise ChunkKVError(
            f"{path} has cache format version {version!r}; chunkkv {__version__} reads versions "
            f"{READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]}: {hint}"
        )


def _prefix(meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> CompressedPrefix:
    packed = "layer.0.head_lengths" in tensors
    try:
        n_layers, prefix_len = int(meta["layers"]), int(meta["prefix_tokens"])
        read_layer = _packed_layer if packed else _layer
        layers = [read_layer(tensors, i, prefix_len) for i in range(n_layers)]
    except (KeyError, TypeError, ValueError) as err:
        raise ChunkKVError(f"{path} is corrupt: {err.args[0] if err.args else err}") from None
    if n_layers < 1 or len(tensors) != (4 if packed else 3) * n_layers:
        raise ChunkKVError(f"{path} is corrupt: {len(tensors)} tensors for {n_layers} layers")
    keys, values, positions = (list(column) for column in zip(*(layer[:3] for layer in layers)))
    head_lengths = [layer[3] for layer in layers] if packed else None
    full_bytes = int(meta.get("full_kv_bytes", 0))
    return CompressedPrefix(keys, values, positions, prefix_len, full_bytes=full_bytes, head_lengths=head_lengths)


def _layer(tensors: dict, i: int, prefix_len: int) -> tuple:
    names = [f"layer.{i}.{part}" for part in ("keys", "values", "positions")]
    missing = [name for name in names if name not in tensors]
    if missing:
        raise KeyError(f"tensor {missing[0]} is missing")
    keys, values, positions = (tensors[name] for name in names)
    n_kept = keys.shape[-2] if keys.dim() == 4 else -1
    shapes_ok = keys.dim() == 4 and keys.shape[0] == 1 and values.shape == keys.shape and 1 <= n_kept <= prefix_len
    if not shapes_ok or not keys.is_floating_point() or values.dtype != keys.dtype:
        raise ValueError(f"layer {i} holds keys {tuple(keys.shape)} and values {tuple(values.shape)}")
    allowed = ((1, n_kept), (1, keys.shape[1], n_kept))
    if tuple(positions.shape) not in allowed or positions.dtype != torch.int64:
        raise ValueError(f"layer {i} positions {tuple(positions.shape)} do not match its {n_kept} kept tokens")
    if positions.min() < 0 or positions.max() >= prefix_len:
        raise ValueError(f"layer {i} positions fall outside the {prefix_len}-token prefix")
    return keys, values, positions


def _packed_layer(tensors: dict, i: int, prefix_len: int) -> tuple:
    """A layer stored per head: keys/values (total, d), positions (total,), head_lengths (kv_heads,)."""
    names = [f"layer.{i}.{part}" for part in ("keys", "values", "positions", "head_lengths")]
    missing = [name for name in names if name not in tensors]
    if missing:
        raise KeyError(f"tensor {missing[0]} is missing")
    keys, values, positions, lengths = (tensors[name] for name in names)
    if keys.dim() != 2 or values.shape != keys.shape or not keys.is_floating_point() or values.dtype != keys.dtype:
        raise ValueError(f"layer {i} holds keys {tuple(keys.shape)} and values {tuple(values.shape)}")
    if lengths.dim() != 1 or lengths.dtype != torch.int64 or lengths.min() < 1 or int(lengths.sum()) != keys.shape[0]:
        raise ValueError(f"layer {i} head lengths {lengths.tolist()} do not add up to its {keys.shape[0]} kept tokens")
    if positions.shape != (keys.shape[0],) or positions.dtype != torch.int64:
        raise ValueError(f"layer {i} positions {tuple(positions.shape)} do not match its {keys.shape[0]} kept tokens")
    if positions.min() < 0 or positions.max() >= prefix_len or lengths.max() > prefix_len:
        raise ValueError(f"layer {i} positions fall outside the {prefix_len}-token prefix")
    return keys, values, positions, lengths.tolist()


def check_model(meta: dict, identity: dict, path: str | Path) -> None:
    """Refuse a cache made with another model or tokenizer, naming both."""
    theirs = meta.get("model") or {}
    checks = (("config_sha256", "model"), ("weights_sha256", "model's weights"), ("tokenizer_sha256", "tokenizer"))
    for key, what in checks:
        if theirs.get(key) != identity[key]:
            raise ChunkKVError(
                f"{path} was made with another {what}: {theirs.get('name')} ({key} {str(theirs.get(key))[:12]}), "
                f"not {identity['name']} ({identity[key][:12]}); use --model {theirs.get('spec')} "
                "or compress the document again with this model"
            )


def check_shapes(prefix: CompressedPrefix, config, path: str | Path) -> None:
    """Layers, KV heads and head size must be the model's."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = (config.num_hidden_layers, config.num_key_value_heads, head_dim)
    for i, keys in enumerate(prefix.keys):
        heads = keys.shape[1] if prefix.head_lengths is None else len(prefix.head_lengths[i])
        found = (len(prefix.keys), heads, keys.shape[-1])
        if found != expected:
            raise ChunkKVError(
                f"{path} holds {found[0]} layers x {found[1]} KV heads x {found[2]} dims, but the model has "
                f"{expected[0]} x {expected[1]} x {expected[2]}; compress the document again with this model"
            )
