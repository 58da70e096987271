"""Helpers shared by several commands: reading the document, progress bars, byte sizes, streaming text."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from chunkkv_cli.commands.options import small_budget_warning


def read_text(document: str) -> str:
    """The document's text: a file, or - for standard input (checked for being empty, binary, ...)."""
    from chunkkv_cli.documents import read_document

    return read_document(document)


def progress_bar(console: Console, quiet: bool) -> Progress:
    """A transient spinner-and-bar on stderr; off for --json and when stderr is not a terminal."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def emit(piece: str) -> None:
    """Stream a piece of an answer to stdout as it is decoded."""
    sys.stdout.write(piece)
    sys.stdout.flush()


def end_stream() -> None:
    emit("\n")


def warn_small_budget(console: Console, compressor, n_tokens: int) -> None:
    message = small_budget_warning(compressor, n_tokens)
    if message:
        console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set this option (by name: Typer may vendor its own click and ParameterSource)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def compress_text(loaded, text: str, compression, limit: int, truncate: bool, progress, task):
    """The document's question-independent prompt prefix, prefilled and compressed (a progress bar per layer).

    Shared by `compress` and `ask --questions`; returns a `reuse.CompressedPrefix`.
    """
    from chunkkv_cli.documents import fit_prefix_to_context
    from chunkkv_cli.reuse import compress_prefix

    compressor = compression.compressor()
    progress.update(task, description="tokenising", total=None)
    ids = fit_prefix_to_context(loaded.tokenizer, text, limit, truncate)
    warn_small_budget(progress.console, compressor, len(ids))
    n_layers = loaded.model.config.num_hidden_layers
    progress.update(task, description=f"prefill + {compressor.name}", total=n_layers, completed=0)
    on_layer = lambda _: progress.advance(task)  # noqa: E731
    return compress_prefix(loaded.model, ids, compressor, compression.reuse_layers, on_layer, loaded.tokenizer)
