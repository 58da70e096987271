"""One question about one document: compressed prefill, then a streamed answer."""

from __future__ import annotations

import time
from typing import Callable

import torch

from chunkkv_cli.compress import Compressor
from chunkkv_cli.generate import cache_bytes, decode, kept_lengths, new_target, prefill, synchronize
from chunkkv_cli.result import Answer


def eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer is not None and tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids |= set(configured if isinstance(configured, (list, tuple)) else [configured])
    return ids


class TextStream:
    """Turns token ids into text pieces as they arrive (decoding the whole answer so far keeps merges right)."""

    def __init__(self, tokenizer, emit: Callable[[str], None] | None, stop_ids: set[int]):
        self.tokenizer, self.emit, self.stop_ids = tokenizer, emit, stop_ids
        self.ids: list[int] = []
        self.text = ""
        self.done = False

    def __call__(self, token: torch.Tensor) -> None:
        token_id = int(token[0])
        if self.done or token_id in self.stop_ids:
            self.done = True
            return
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.emit is not None and not text.endswith("\ufffd"):
            self.emit(text[len(self.text):])
            self.text = text
        elif self.emit is None:
            self.text = text


def recall_state(compressor: Compressor, cache):
    """The decode route of a method that selects at every step (built on the full prefilled cache), else None."""
    return compressor.decode_route(cache) if compressor.caps.per_step else None


def stream_answer(
    model, tokenizer, cache, logits, start_pos: int, max_new_tokens: int, on_text=None, temperature=0.0, top_p=1.0,
    decoder: str = "hf",
    recall=None,
) -> dict:
    """Decode from `cache` after `logits`, streaming text to `on_text`.

    Returns the decoding fields of an `Answer`: text, token_ids (stop tokens left out), new_tokens, decode_seconds.
    """
    device = logits.device
    stops = eos_ids(model, tokenizer)
    stream = TextStream(tokenizer, on_text, stops)
    start = time.perf_counter()
    tokens = decode(model, cache, logits, start_pos, max_new_tokens, stops, temperature, top_p, stream, decoder, recall)
    synchronize(device)
    text = stream.text.strip() or tokenizer.decode(stream.ids, skip_special_tokens=True).strip()
    return {"text": text, "token_ids": stream.ids, "new_tokens": tokens.shape[1],
            "decode_seconds": time.perf_counter() - start}  # fmt: skip


def answer(
    model,
    tokenizer,
    ids: list[int],
    compressor: Compressor,
    reuse_layers: int = 1,
    max_new_tokens: int = 128,
    on_text: Callable[[str], None] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_layer: Callable[[int], None] | None = None,
    decoder: str = "hf",
) -> Answer:
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    target = new_target(model, compressor, reuse_layers)
    pre = prefill(model, input_ids, [target], on_layer)
    kept = kept_lengths(target.cache)
    recall = recall_state(compressor, target.cache)
    kept_bytes = cache_bytes(target.cache)  # on the device: after clusterkv's --offload cpu moved the clustered part
    decoded = stream_answer(
        model, tokenizer, target.cache, pre.logits, len(ids), max_new_tokens, on_text, temperature, top_p, decoder,
        recall,
    )
    return Answer(
        prompt_tokens=len(ids),
        kept_tokens=sum(kept) / len(kept),
        full_kv_bytes=pre.full_bytes,
        kept_kv_bytes=kept_bytes,
        prefill_seconds=pre.seconds,
        compress_seconds=pre.compress_seconds + (recall.seconds if recall is not None else 0.0),
        kept_per_layer=kept,
        **decoded,
    )
