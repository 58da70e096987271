"""`chunkkv ask`: answer a question about a long document from a compressed KV cache."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from chunkkv_cli.api import CompressedCache, Hooks, load
from chunkkv_cli.commands.common import emit, end_stream, given, mib, progress_bar, progress_hooks, read_text
from chunkkv_cli.commands.options import (
    DEFAULT_MODEL,
    BudgetOpt,
    ChunkSizeOpt,
    DecoderOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    PrefillBlockOpt,
    MaxNewTokensOpt,
    ParamOpt,
    method_name,
    MethodOpt,
    ModelOpt,
    OffloadOpt,
    RatioOpt,
    ReuseOpt,
    TemperatureOpt,
    TopPOpt,
    TruncateOpt,
    TrustRemoteCodeOpt,
    WindowOpt,
    require_reusable,
)
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.options import Compression, Generation, ModelSpec

EXAMPLES = """[b]Examples[/b]

  chunkkv ask samples/lighthouse.md "Who repaired the lens in 1911?"

  chunkkv ask report.txt "Summarise the findings" --method snapkv --ratio 0.2

  cat notes.md | chunkkv ask - "What is the deadline?" --budget 512 --json

  chunkkv ask lighthouse.ckv "Who designed the tower?"      # a cache saved by `chunkkv compress`

  chunkkv ask samples/lighthouse.md "Who repaired the lens?" --method clusterkv --budget 1024

  chunkkv ask samples/lighthouse.md --questions samples/questions.txt --ratio 0.2 --json
"""
QuestionsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--questions",
        help="File of questions, one per line or JSONL with a 'question' field: the document is compressed once "
        "(question-agnostic) and each question answered from its own copy of the cache.",
    ),
]
# Options that decide how a document is compressed: meaningless for a cache that is already compressed.
COMPRESSION_OPTIONS = ("reuse_layers", "truncate")
# With a .ckv, these narrow the stored tokens per question (the question's queries score them); they need a size.
NARROWING_OPTIONS = ("method", "ratio", "budget", "chunk_size", "window", "params")


def ask(
    ctx: typer.Context,
    document: Annotated[
        str,
        typer.Argument(help="Text or markdown file, - for standard input, or a .ckv cache from `chunkkv compress`."),
    ],
    question: Annotated[Optional[str], typer.Argument(help="The question to answer from the document.")] = None,
    questions: QuestionsOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    method: MethodOpt = None,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    chunk_size: ChunkSizeOpt = None,
    window: WindowOpt = 32,
    reuse_layers: ReuseOpt = 1,
    params: ParamOpt = None,
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    truncate: TruncateOpt = False,
    decoder: DecoderOpt = "auto",
    offload: OffloadOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    prefill_block: PrefillBlockOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Answer a question about a long document, with the KV cache compressed (ChunkKV by default)."""
    spec = ModelSpec(model, device, dtype, trust_remote_code, prefill_block)
    generation = Generation(max_new_tokens, temperature, top_p, decoder)
    asked = _questions(question, questions)
    if document.endswith(".ckv"):
        _reject_compression_options(ctx, document)
        narrow = _narrowing(ctx, method, ratio, budget, window, chunk_size, params)
        return _ask_cache(document, asked, spec, given(ctx, "model"), generation, json_out, questions is not None, narrow)
    compression = Compression(method_name(method, questions is None), ratio, budget, window, chunk_size, reuse_layers,
                              offload, tuple(params or ()))  # fmt: skip
    compressor = compression.compressor()  # the method's own checks fail before the document is read
    if questions is not None:
        require_reusable(compressor, "ask --questions")
        return _ask_many(read_text(document), asked, spec, compression, generation, truncate, json_out)
    _ask_text(read_text(document), question, spec, compression, generation, truncate, json_out)


def _ask_text(text, question, spec, compression, generation, truncate, json_out) -> None:
    """One question about a text document: prefill the whole prompt (question-aware), stream the answer."""
    err = Console(stderr=True)
    with progress_bar(err, json_out) as progress:
        task = progress.add_task("loading model", total=None)
        model = load(spec)
        n_layers = model.loaded.model.config.num_hidden_layers

        def on_layer(layer_idx: int) -> None:
            progress.advance(task)
            if layer_idx == n_layers - 1:
                progress.stop()  # the answer streams to stdout next

        hooks = progress_hooks(progress, task, on_text=None if json_out else emit)
        hooks.on_layer = on_layer
        result = model.ask(text, question, compression, generation, truncate, hooks)
    if json_out:
        report = {"method": compression.method, "model": model.name, **result.record()}
        typer.echo(json.dumps(report, indent=2))
        return
    end_stream()
    err.print(_summary(result), highlight=False)


def _summary(r) -> str:
    saving = 1 - r.kept_kv_bytes / r.full_kv_bytes if r.full_kv_bytes else 0.0
    return (
        f"[dim]{r.prompt_tokens} prompt tokens → {r.kept_tokens:.0f} kept per layer · "
        f"KV {mib(r.full_kv_bytes)} → {mib(r.kept_kv_bytes)} (−{saving:.0%}) · "
        f"prefill {r.prefill_seconds:.2f} s (compression {r.compress_seconds * 1000:.0f} ms) · "
        f"decode {r.new_tokens} tokens in {r.decode_seconds:.2f} s[/dim]"
    )


def _questions(question: str | None, questions_file: Path | None) -> list[str]:
    if question is not None and questions_file is not None:
        raise ChunkKVError("give either a QUESTION or --questions FILE, not both")
    if questions_file is not None:
        from chunkkv_cli.documents import read_questions

        return read_questions(str(questions_file))
    if question is None:
        raise ChunkKVError("give a question after the document, or --questions FILE")
    if not question.strip():
        raise ChunkKVError("the question is empty; give the question to answer after the document")
    return [question]


def _reject_compression_options(ctx: typer.Context, document: str) -> None:
    set_here = [name for name in COMPRESSION_OPTIONS if given(ctx, name)]
    if set_here:
        raise ChunkKVError(
            f"--{set_here[0].replace('_', '-')} sets how a document is compressed, but {document} is already "
            "compressed; run `chunkkv compress` again to change it (`chunkkv inspect` shows its settings)"
        )


def _narrowing(ctx, method, ratio, budget, window, chunk_size, params):
    """The method that re-selects a stored cache's tokens with each question as its window, or None."""
    set_here = [name for name in NARROWING_OPTIONS if given(ctx, name)]
    if not set_here:
        return None
    if ratio is None and budget is None:
        raise ChunkKVError(f"--{set_here[0].replace('_', '-')} with a .ckv narrows the stored tokens per question: "
                           "give --ratio or --budget (of the document) to say how many to keep")  # fmt: skip
    return Compression(method_name(method, True), ratio, budget, window, chunk_size, params=tuple(params or ())).compressor()


def _ask_cache(path, asked, spec, model_given, generation, json_out, many, narrow=None):
    """Answer from a saved .ckv: the model is --model if given, else the one the cache was made with."""
    cache = CompressedCache.load(path)
    if not model_given:
        spec = replace(spec, model=(cache.meta.get("model") or {}).get("spec") or DEFAULT_MODEL)
    with progress_bar(Console(stderr=True), json_out) as progress:
        progress.add_task("loading model", total=None)
        model = load(spec)
    label = {"method": cache.method, "model": model.name, "cache": path}
    if narrow is not None:
        label["narrowed_by"] = narrow.name
    if many:
        return _answer_table(model, cache, asked, label, json_out, generation, narrow)
    _answer_one_cached(model, cache, asked[0], label, json_out, generation, narrow)


def _ask_many(text, asked, spec, compression, generation, truncate, json_out):
    """Compress the document once without the questions, then answer each from its own copy."""
    from chunkkv_cli.documents import question_ids

    with progress_bar(Console(stderr=True), json_out) as progress:
        task = progress.add_task("loading model", total=None)
        model = load(spec)
        room = generation.max_new_tokens + max(len(question_ids(model.loaded.tokenizer, q)) for q in asked)
        cache = model.compress(text, compression, truncate, room, progress_hooks(progress, task))
    label = {"method": compression.method, "model": model.name}
    _answer_table(model, cache, asked, label, json_out, generation)


def _answer_table(model, cache, asked, label, json_out, generation, narrow=None) -> None:
    """One row per question (JSONL lines as they finish with --json, else a table at the end)."""
    rows = []
    with progress_bar(Console(stderr=True), json_out) as progress:
        task = progress.add_task("answering", total=len(asked))
        start = time.perf_counter()
        for question, result in zip(asked, model.answers(cache, asked, generation, narrow=narrow)):
            row = {"question": question, "answer": result.text, "seconds": round(time.perf_counter() - start, 3),
                   "new_tokens": result.new_tokens, "prompt_tokens": result.prompt_tokens,
                   "kept_tokens": result.kept_tokens, **label}  # fmt: skip
            if json_out:
                typer.echo(json.dumps(row))
            rows.append(row)
            progress.advance(task)
            start = time.perf_counter()
    if not json_out:
        Console().print(_table(rows, label))


def _table(rows: list[dict], label: dict) -> Table:
    kept, prompt = rows[0]["kept_tokens"], rows[0]["prompt_tokens"]
    title = f"{label['model']} · {label['method']} · {kept:.0f} of {prompt} tokens kept per layer"
    table = Table(title=title)
    table.add_column("question")
    table.add_column("answer")
    table.add_column("s", justify="right")
    for row in rows:
        table.add_row(row["question"], row["answer"], f"{row['seconds']:.2f}")
    return table


def _answer_one_cached(model, cache, question, label, json_out, generation, narrow=None) -> None:
    hooks = Hooks(on_text=None if json_out else emit)
    result = next(model.answers(cache, [question], generation, hooks, narrow))
    if json_out:
        typer.echo(json.dumps({**label, **result.record()}, indent=2))
        return
    end_stream()
    Console(stderr=True).print(
        f"[dim]{label['cache']}: {result.prompt_tokens} prompt tokens → {result.kept_tokens:.0f} kept per layer "
        f"({label['method']}) · question appended in {result.prefill_seconds:.2f} s · "
        f"decode {result.new_tokens} tokens in {result.decode_seconds:.2f} s[/dim]",
        highlight=False,
    )
