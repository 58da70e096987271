"""`chunkkv ask`: answer a question about a long document from a compressed KV cache."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from chunkkv_cli.commands.options import (
    DEFAULT_MODEL,
    BudgetOpt,
    ChunkSizeOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    RatioOpt,
    ReuseOpt,
    WindowOpt,
)
from chunkkv_cli.errors import ChunkKVError

EXAMPLES = """[b]Examples[/b]

  chunkkv ask samples/lighthouse.md "Who repaired the lens in 1911?"

  chunkkv ask report.txt "Summarise the findings" --method snapkv --ratio 0.2

  cat notes.md | chunkkv ask - "What is the deadline?" --budget 512 --json
"""


class Method(str, Enum):
    chunkkv = "chunkkv"
    snapkv = "snapkv"
    pyramidkv = "pyramidkv"
    h2o = "h2o"
    streamingllm = "streamingllm"
    fullkv = "fullkv"


def ask(
    document: Annotated[str, typer.Argument(help="Text or markdown file, or - for standard input.")],
    question: Annotated[str, typer.Argument(help="The question to answer from the document.")],
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[Method, typer.Option(help="KV compression method.")] = Method.chunkkv,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    chunk_size: ChunkSizeOpt = 10,
    window: WindowOpt = 32,
    reuse_layers: ReuseOpt = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold (with --temperature).")] = 1.0,
    truncate: Annotated[bool, typer.Option(help="Cut the document to fit the context instead of failing.")] = False,
    decoder: Annotated[str, typer.Option(help="hf (a transformers forward per token) or fast (static cache, CUDA graph on GPU; experimental).")] = "hf",
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow code shipped in a model folder to run.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Answer a question about a long document, with the KV cache compressed (ChunkKV by default)."""
    from chunkkv_cli.compress import make_compressor

    if max_new_tokens < 1:
        raise ChunkKVError("--max-new-tokens must be at least 1")
    if reuse_layers < 1:
        raise ChunkKVError("--reuse-layers must be at least 1")
    if decoder not in ("hf", "fast"):
        raise ChunkKVError(f"--decoder must be hf or fast, got {decoder!r}")
    compressor = make_compressor(method.value, ratio=ratio, budget=budget, window=window, chunk_size=chunk_size)
    text = _read(document)
    err = Console(stderr=True)
    with _progress(err, json_out) as progress:
        task = progress.add_task("loading model", total=None)
        loaded = _load(model, device, dtype, trust_remote_code)
        progress.update(task, description="tokenising")
        limit = loaded.profile.max_context - max_new_tokens
        ids = _fit(loaded.tokenizer, text, question, limit, truncate)
        n_layers = loaded.model.config.num_hidden_layers
        progress.update(task, description=f"prefill + {method.value}", total=n_layers, completed=0)

        def on_layer(layer_idx: int) -> None:
            progress.advance(task)
            if layer_idx == n_layers - 1:
                progress.stop()  # the answer streams to stdout next

        result = _answer(
            loaded, ids, compressor, reuse_layers, max_new_tokens, temperature, top_p, on_layer, json_out, decoder
        )
    if json_out:
        typer.echo(json.dumps({"method": method.value, "model": loaded.profile.name, **result.as_dict()}, indent=2))
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    err.print(_summary(result), highlight=False)


def _read(document: str) -> str:
    from chunkkv_cli.documents import read_document

    return read_document(document)


def _load(model: str, device: str, dtype: str, trust_remote_code: bool):
    from chunkkv_cli.model import load_model

    loaded = load_model(model, device, None if dtype == "auto" else dtype, trust_remote_code=trust_remote_code)
    if loaded.tokenizer is None:
        raise ChunkKVError(f"{model} has no weights or tokenizer to answer with; use a model with weights")
    return loaded


def _fit(tokenizer, text: str, question: str, limit: int, truncate: bool) -> list[int]:
    from chunkkv_cli.documents import fit_to_context

    return fit_to_context(tokenizer, text, question, limit, truncate)


def _answer(loaded, ids, compressor, reuse_layers, max_new_tokens, temperature, top_p, on_layer, quiet, decoder):
    from chunkkv_cli.pipeline import answer

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    return answer(
        loaded.model,
        loaded.tokenizer,
        ids,
        compressor,
        reuse_layers=reuse_layers,
        max_new_tokens=max_new_tokens,
        on_text=None if quiet else emit,
        temperature=temperature,
        top_p=top_p,
        on_layer=on_layer,
        decoder=decoder,
    )


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )


def _summary(r) -> str:
    saving = 1 - r.kept_kv_bytes / r.full_kv_bytes if r.full_kv_bytes else 0.0
    return (
        f"[dim]{r.prompt_tokens} prompt tokens → {r.kept_tokens:.0f} kept per layer · "
        f"KV {_mib(r.full_kv_bytes)} → {_mib(r.kept_kv_bytes)} (−{saving:.0%}) · "
        f"prefill {r.prefill_seconds:.2f} s (compression {r.compress_seconds * 1000:.0f} ms) · "
        f"decode {r.new_tokens} tokens in {r.decode_seconds:.2f} s[/dim]"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
