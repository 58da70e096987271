"""Prefill with compression, then decode on the compressed cache (the `hf` decoder: one forward per token)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from transformers import DynamicCache

from chunkkv_cli.blocked import blocked_route, choose_block, in_blocks
from chunkkv_cli.compress import Compressor
from chunkkv_cli.errors import ChunkKVError, note_once
from chunkkv_cli.compress.base import gather_tokens
from chunkkv_cli.documents import pass_request_ids
from chunkkv_cli.engine import CompressionSession, Target, forward, full_range, store_layer, use_compressing_attention
from chunkkv_cli.options import DECODERS, PREFILL_BLOCK_ATTR
from chunkkv_cli.packed import PackedCache, is_per_head
from chunkkv_cli.route import is_sliding


@dataclass
class Prefill:
    """What prefill leaves behind: next-token logits and the timing of the pass."""

    logits: torch.Tensor  # (batch, vocab) at the last prompt position
    prompt_len: int
    seconds: float
    compress_seconds: float
    full_bytes: int  # KV bytes the uncompressed cache would hold, summed over the layers as they passed
    pass_seconds: float = 0.0  # the methods' own scoring passes after the forward (in `seconds` too)
    block: int = 0  # tokens per block each layer ran over (prompt_len: unblocked)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_target(model, compressor: Compressor, reuse_layers: int = 1, record: bool = False) -> Target:
    return Target(compressor, DynamicCache(config=model.config), reuse_layers=reuse_layers, record=record)


@torch.inference_mode()
def prefill(
    model, input_ids: torch.Tensor, targets: list[Target], on_layer=None, repeat_prompt=None, tokenizer=None,
    block: int | None = None,
) -> Prefill:
    """Run the prompt once; every target's cache ends up holding its compressed KV.

    input_ids: (batch, prompt_len). With several targets the model works on a scratch cache
    whose layers are freed as soon as the targets have taken their share. Methods with a scoring
    pass of their own (`caps.own_pass`) keep the full cache through the forward, then run that pass
    (`repeat_prompt`: token ids of the method's request, else phrased by `tokenizer`) and keep what it chooses;
    `seconds` and `compress_seconds` include the pass. Each layer runs over blocks of `block` tokens
    (`blocked.choose_block`: checked against free GPU memory; by default the largest that fits up to
    `memory.AUTO_PREFILL_BLOCK` on a GPU, and no blocks on the CPU); attention still covers the whole prefix.
    """
    use_compressing_attention(model)
    work = targets[0].cache if len(targets) == 1 else DynamicCache(config=model.config)
    session = CompressionSession(work, targets, model.config.num_hidden_layers, on_layer)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    seq = input_ids.shape[1]
    block = choose_block(model, input_ids, targets, block if block is not None else getattr(model, PREFILL_BLOCK_ATTR, None))
    route = session if block >= seq else blocked_route(session, targets, seq)
    synchronize(input_ids.device)
    start = time.perf_counter()
    with in_blocks(model, seq, block):
        out = forward(model, input_ids, work, positions, route=route, last_only=True)
    synchronize(input_ids.device)
    forward_done = time.perf_counter()
    passes = [target for target in targets if target.compressor.caps.own_pass]
    for target in passes:
        request = repeat_prompt if repeat_prompt is not None else pass_request_ids(tokenizer, target.compressor)
        apply_score_pass(model, target, input_ids, request)
    synchronize(input_ids.device)
    pass_seconds = time.perf_counter() - forward_done if passes else 0.0
    logits = out.logits[:, -1].float()
    compress_seconds = session.compress_seconds() + pass_seconds
    return Prefill(logits, seq, forward_done - start + pass_seconds, compress_seconds, session.full_bytes, pass_seconds,
                   block)


def apply_score_pass(model, target: Target, input_ids: torch.Tensor, repeat_prompt=()) -> None:
    """Run the method's own pass over the fully prefilled cache and keep, per layer, the tokens it chooses.

    A selection with per-head lengths replaces the target's cache by a `packed.PackedCache`.
    """
    keep = target.compressor.score_pass(model, target.cache, input_ids, repeat_prompt)
    if is_per_head(keep):
        target.cache = PackedCache.gather(target.cache, keep)
        if target.record:
            target.kept.update({layer_idx: idx.positions for layer_idx, idx in enumerate(keep)})
        return
    for layer_idx, idx in enumerate(keep):
        layer = target.cache.layers[layer_idx]
        if idx is None and is_sliding(layer):  # the window the model keeps, recorded as such at prefill
            continue
        keys, values = (layer.keys, layer.values) if idx is None else (gather_tokens(layer.keys, idx), gather_tokens(layer.values, idx))
        store_layer(target.cache, layer_idx, keys.contiguous(), values.contiguous())
        if target.record:
            target.kept[layer_idx] = full_range(keys) if idx is None else idx.detach().cpu()


def pick_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """Greedy when temperature is 0, else nucleus sampling. (batch, vocab) -> (batch,)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def hf_step(model, cache, start_pos: int, route=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """One transformers forward per token on a DynamicCache (the `hf` decoder); `route` steers its attention."""
    position = [start_pos]

    def step(token: torch.Tensor) -> torch.Tensor:
        ids = token[:, None]
        pos = torch.full_like(ids, position[0])
        position[0] += 1
        return forward(model, ids, cache, pos, route=route).logits[:, -1]

    return step


def resolve_decoder(decoder: str, device: torch.device, recall=None, cache=None) -> str:
    """`auto` is the hf decoder on the CPU (where fast does not win), with offloading, or when `cache`'s layers lie
    on several devices (one CUDA graph cannot span them); on one GPU it is `compiled` (`fast` if compiling fails)."""
    offloaded = recall is not None and recall.offloaded
    devices = set() if cache is None else {layer.keys.device for layer in cache.layers if layer.keys is not None}
    sliding = cache is not None and any(is_sliding(layer) for layer in cache.layers)
    if decoder == "auto":
        if sliding and device.type == "cuda" and not offloaded:
            note_once(SLIDING_FALLBACK)
        if device.type != "cuda" or offloaded or len(devices) > 1 or sliding:
            return "hf"
        return "compiled"
    if sliding and decoder != "hf":
        raise ChunkKVError(f"--decoder {decoder}: {SLIDING_FALLBACK.split(': ', 1)[1]}: use --decoder hf or auto")
    if offloaded and decoder != "hf":
        raise ChunkKVError("--offload cpu copies selected tokens from host memory at every step: use --decoder hf")
    if len(devices) > 1 and decoder != "hf":
        raise ChunkKVError(f"--decoder {decoder} needs the whole cache on one GPU, and this model is split: use --decoder hf")
    return decoder


SLIDING_FALLBACK = (
    "decoding with the hf decoder: the fast decoder's static buffers grow every layer by one token a step, "
    "and this model's sliding-window layers must drop their oldest token instead"
)


def make_step(model, cache, start_pos: int, max_new_tokens: int, decoder: str = "hf", recall=None):
    """`step(token) -> logits`; `recall` (a per-step method's decode route) chooses what each step attends to.

    `decoder` goes through `resolve_decoder` here, where the cache is known, so every caller gets the
    same choice for `auto` and the same refusals (offloaded clusters, a cache split over devices).
    """
    device = next(layer.keys.device for layer in cache.layers if layer.keys is not None)
    chosen = resolve_decoder(decoder, device, recall, cache)
    if chosen in ("fast", "compiled"):
        from chunkkv_cli.fast_decode import FastDecoder

        return FastDecoder(
            model, cache, start_pos, max_new_tokens, compile=chosen == "compiled", recall=recall, fall_back=decoder == "auto"
        ).step
    if chosen != "hf":
        raise ChunkKVError(f"--decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    return hf_step(model, cache, start_pos, recall)


@torch.inference_mode()
def decode(
    model,
    cache,
    first_logits: torch.Tensor,
    start_pos: int,
    max_new_tokens: int,
    eos_ids: Iterable[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_token: Callable[[torch.Tensor], None] | None = None,
    decoder: str = "auto",
    recall=None,
    step: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` per sequence from a (compressed) cache.

    New tokens get RoPE positions start_pos, start_pos + 1, ... (the uncompressed numbering), not
    the cache length. Returns (batch, n_generated); finished sequences are padded with their EOS.
    decoder="fast" moves the cache into static buffers (leaving `cache` empty) and, on CUDA,
    replays each step as a CUDA graph ("compiled" also fuses the model's kernels with torch.compile);
    "hf" grows `cache` one forward at a time; "auto": see `resolve_decoder`. A ready `step`
    (from `make_step`) overrides cache and decoder.
    """
    device = first_logits.device
    if step is None:
        step = make_step(model, cache, start_pos, max_new_tokens, decoder, recall)
    eos = torch.tensor(sorted(set(eos_ids)), device=device, dtype=torch.long)
    token = pick_token(first_logits, temperature, top_p)
    finished = torch.zeros_like(token, dtype=torch.bool)
    generated = []
    for index in range(max_new_tokens):
        token = torch.where(finished, generated[-1] if generated else token, token)
        generated.append(token)
        if on_token is not None:
            on_token(token)
        finished |= torch.isin(token, eos)
        if index == max_new_tokens - 1 or (eos.numel() and bool(finished.all())):
            break
        token = pick_token(step(token), temperature, top_p)
    return torch.stack(generated, dim=1)


def cache_bytes(cache) -> int:
    """Bytes held by a cache's key and value tensors, as allocated (a packed cache counts its own)."""
    if isinstance(cache, PackedCache):
        return cache.nbytes()
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )


def kept_lengths(cache) -> list[float]:
    """Tokens per layer (per KV head on average where heads keep lengths of their own)."""
    if isinstance(cache, PackedCache):
        return cache.kept_lengths()
    return [layer.keys.shape[-2] if layer.keys is not None else 0 for layer in cache.layers]
