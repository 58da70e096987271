"""`chunkkv ask`: answer a question about a long document from a compressed KV cache."""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from chunkkv_cli.commands.options import (
    require_reusable,
    DecoderOpt,
    check_decoder,
    check_sampling,
    small_budget_warning,
    offload_args,
    DEFAULT_MODEL,
    BudgetOpt,
    ChunkSizeOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxNewTokensOpt,
    ModelOpt,
    OffloadOpt,
    RatioOpt,
    ReuseOpt,
    TemperatureOpt,
    TopPOpt,
    TruncateOpt,
    TrustRemoteCodeOpt,
    WindowOpt,
)
from chunkkv_cli import registry
from chunkkv_cli.errors import ChunkKVError

EXAMPLES = """[b]Examples[/b]

  chunkkv ask samples/lighthouse.md "Who repaired the lens in 1911?"

  chunkkv ask report.txt "Summarise the findings" --method snapkv --ratio 0.2

  cat notes.md | chunkkv ask - "What is the deadline?" --budget 512 --json

  chunkkv ask lighthouse.ckv "Who designed the tower?"      # a cache saved by `chunkkv compress`

  chunkkv ask samples/lighthouse.md "Who repaired the lens?" --method clusterkv --budget 1024

  chunkkv ask samples/lighthouse.md --questions samples/questions.txt --ratio 0.2 --json
"""


Method = Enum("Method", {name: name for name in registry.names()}, type=str)


MethodOpt = Annotated[Method, typer.Option(help="KV compression method.")]
QuestionsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--questions",
        help="File of questions, one per line or JSONL with a 'question' field: the document is compressed once "
        "(question-agnostic) and each question answered from its own copy of the cache.",
    ),
]
# Options that decide how a document is compressed: meaningless for a cache that is already compressed.
COMPRESSION_OPTIONS = ("method", "ratio", "budget", "chunk_size", "window", "reuse_layers", "truncate")


def ask(
    ctx: typer.Context,
    document: Annotated[
        str,
        typer.Argument(help="Text or markdown file, - for standard input, or a .ckv cache from `chunkkv compress`."),
    ],
    question: Annotated[Optional[str], typer.Argument(help="The question to answer from the document.")] = None,
    questions: QuestionsOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    method: MethodOpt = Method.chunkkv,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    chunk_size: ChunkSizeOpt = 10,
    window: WindowOpt = 32,
    reuse_layers: ReuseOpt = 1,
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    truncate: TruncateOpt = False,
    decoder: DecoderOpt = "auto",
    offload: OffloadOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Answer a question about a long document, with the KV cache compressed (ChunkKV by default)."""
    from chunkkv_cli.compress import applicable, make_compressor

    if max_new_tokens < 1:
        raise ChunkKVError("--max-new-tokens must be at least 1")
    if reuse_layers < 1:
        raise ChunkKVError("--reuse-layers must be at least 1")
    check_decoder(decoder)
    check_sampling(temperature, top_p)
    asked = _questions(question, questions)
    generation = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, decoder=decoder)
    if document.endswith(".ckv"):
        _reject_compression_options(ctx, document)
        model = model if _given(ctx, "model") else None
        many = questions is not None
        return _ask_cache(document, asked, model, device, dtype, trust_remote_code, json_out, generation, many)
    compressor = make_compressor(
        method.value, **applicable(method.value, ratio=ratio, budget=budget, window=window, chunk_size=chunk_size),
        **offload_args(method.value, offload),
    )
    if questions is not None:
        require_reusable(compressor, "ask --questions")
    text = _read(document)
    load = (model, device, dtype, trust_remote_code)
    if questions is not None:
        return _ask_many(text, asked, load, compressor, reuse_layers, truncate, json_out, generation)
    _ask_text(text, question, load, compressor, reuse_layers, truncate, json_out, generation)


def _ask_text(text, question, load, compressor, reuse_layers, truncate, json_out, generation) -> None:
    """One question about a text document: prefill the whole prompt (question-aware), stream the answer."""
    max_new_tokens = generation["max_new_tokens"]
    err = Console(stderr=True)
    with _progress(err, json_out) as progress:
        task = progress.add_task("loading model", total=None)
        loaded = _load(*load)
        progress.update(task, description="tokenising")
        limit = loaded.profile.max_context - max_new_tokens
        ids = _fit(loaded.tokenizer, text, question, limit, truncate)
        warn_small_budget(err, compressor, len(ids))
        n_layers = loaded.model.config.num_hidden_layers
        progress.update(task, description=f"prefill + {compressor.name}", total=n_layers, completed=0)

        def on_layer(layer_idx: int) -> None:
            progress.advance(task)
            if layer_idx == n_layers - 1:
                progress.stop()  # the answer streams to stdout next

        result = _answer(
            loaded, ids, compressor, reuse_layers, max_new_tokens, generation["temperature"], generation["top_p"],
            on_layer, json_out, generation["decoder"],
        )  # fmt: skip
    if json_out:
        report = {"method": compressor.name, "model": loaded.profile.name, **answer_fields(result)}
        typer.echo(json.dumps(report, indent=2))
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    err.print(_summary(result), highlight=False)


def answer_fields(result) -> dict:
    """An answer's JSON fields, the same names in every command: the answer's text is `answer`."""
    values = result.as_dict()
    return {"answer": values.pop("text"), **values}


def warn_small_budget(console: Console, compressor, n_tokens: int) -> None:
    message = small_budget_warning(compressor, n_tokens)
    if message:
        console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


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


def _emit(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _answer(loaded, ids, compressor, reuse_layers, max_new_tokens, temperature, top_p, on_layer, quiet, decoder):
    from chunkkv_cli.pipeline import answer

    return answer(
        loaded.model,
        loaded.tokenizer,
        ids,
        compressor,
        reuse_layers=reuse_layers,
        max_new_tokens=max_new_tokens,
        on_text=None if quiet else _emit,
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


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set this option (by name: Typer may vendor its own click and ParameterSource)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _reject_compression_options(ctx: typer.Context, document: str) -> None:
    given = [name for name in COMPRESSION_OPTIONS if _given(ctx, name)]
    if given:
        raise ChunkKVError(
            f"--{given[0].replace('_', '-')} sets how a document is compressed, but {document} is already "
            "compressed; run `chunkkv compress` again to change it (`chunkkv inspect` shows its settings)"
        )


def _ask_cache(path, asked, model, device, dtype, trust_remote_code, json_out, generation, many):
    """Answer from a saved .ckv: the model is --model if given, else the one the cache was made with."""
    from chunkkv_cli.cache_io import check_model, check_shapes, model_identity, read
    from chunkkv_cli.documents import question_ids

    meta, prefix = read(path)
    spec = model or (meta.get("model") or {}).get("spec") or DEFAULT_MODEL
    with _progress(Console(stderr=True), json_out) as progress:
        progress.add_task("loading model", total=None)
        loaded = _load(spec, device, dtype, trust_remote_code)
    check_model(meta, model_identity(loaded, spec), path)
    check_shapes(prefix, loaded.model.config, path)
    suffixes = [question_ids(loaded.tokenizer, q) for q in asked]
    _check_room(prefix.prefix_len, suffixes, generation["max_new_tokens"], loaded.profile.max_context, path)
    label = {"method": meta["method"]["name"], "model": loaded.profile.name, "cache": path}
    if many:
        return _answer_table(loaded, prefix, asked, suffixes, label, json_out, generation)
    _answer_one_cached(loaded, prefix, suffixes[0], label, json_out, generation)


def _check_room(prefix_len: int, suffixes: list, max_new_tokens: int, max_context: int, path: str) -> None:
    longest = max(map(len, suffixes))
    if prefix_len + longest + max_new_tokens > max_context:
        raise ChunkKVError(
            f"{path} holds {prefix_len} prompt tokens; with a {longest}-token question and --max-new-tokens "
            f"{max_new_tokens} that exceeds the model's {max_context}-token context: ask a shorter question or "
            "lower --max-new-tokens"
        )


def _ask_many(text, asked, load, compressor, reuse_layers, truncate, json_out, generation):
    """Compress the document once without the questions, then answer each from its own copy."""
    from chunkkv_cli.commands.compress import compress_text
    from chunkkv_cli.documents import question_ids

    with _progress(Console(stderr=True), json_out) as progress:
        task = progress.add_task("loading model", total=None)
        loaded = _load(*load)
        suffixes = [question_ids(loaded.tokenizer, q) for q in asked]
        limit = loaded.profile.max_context - generation["max_new_tokens"] - max(map(len, suffixes))
        prefix = compress_text(loaded, text, compressor, reuse_layers, limit, truncate, progress, task)
    label = {"method": compressor.name, "model": loaded.profile.name}
    _answer_table(loaded, prefix, asked, suffixes, label, json_out, generation)


def _answer_table(loaded, prefix, asked, suffixes, label, json_out, generation) -> None:
    """One row per question (JSONL lines as they finish with --json, else a table at the end)."""
    from chunkkv_cli.reuse import answer_question

    rows = []
    with _progress(Console(stderr=True), json_out) as progress:
        task = progress.add_task("answering", total=len(asked))
        for question, ids in zip(asked, suffixes):
            start = time.perf_counter()
            result = answer_question(loaded.model, loaded.tokenizer, prefix, ids, **generation)
            row = {"question": question, "answer": result.text, "seconds": round(time.perf_counter() - start, 3),
                   "new_tokens": result.new_tokens, "prompt_tokens": result.prompt_tokens,
                   "kept_tokens": result.kept_tokens, **label}  # fmt: skip
            if json_out:
                typer.echo(json.dumps(row))
            rows.append(row)
            progress.advance(task)
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


def _answer_one_cached(loaded, prefix, ids, label, json_out, generation) -> None:
    from chunkkv_cli.reuse import answer_question

    on_text = None if json_out else _emit
    result = answer_question(loaded.model, loaded.tokenizer, prefix, ids, on_text=on_text, **generation)
    if json_out:
        typer.echo(json.dumps({**label, **answer_fields(result)}, indent=2))
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    Console(stderr=True).print(
        f"[dim]{label['cache']}: {result.prompt_tokens} prompt tokens → {result.kept_tokens:.0f} kept per layer "
        f"({label['method']}) · question appended in {result.prefill_seconds:.2f} s · "
        f"decode {result.new_tokens} tokens in {result.decode_seconds:.2f} s[/dim]",
        highlight=False,
    )
