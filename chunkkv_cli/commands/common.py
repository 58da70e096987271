"""Helpers shared by several commands: reading the document, progress bars, byte sizes, streaming text."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


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


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set this option (by name: Typer may vendor its own click and ParameterSource)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def progress_hooks(progress: Progress, task, on_text=None):
    """`api.Hooks` that draw a call's stages and layers on `progress`'s task and print its warnings there."""
    from chunkkv_cli.api import Hooks

    def stage(description: str, total: int | None) -> None:
        progress.update(task, description=description, total=total, completed=0)

    def warn(message: str) -> None:
        progress.console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    return Hooks(on_stage=stage, on_layer=lambda _: progress.advance(task), on_text=on_text, on_warning=warn)
