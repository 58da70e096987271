"""The `chunkkv` command: wires the command modules together and turns known errors into one line."""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from chunkkv_cli import __version__
from chunkkv_cli.errors import ChunkKVError

_stderr = Console(stderr=True)
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


# Click's UsageError, from whichever click Typer uses (recent Typer vendors its own copy).
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _OneLineUsageErrors:
    """Click's usage errors (an unknown option or choice, a word where a number belongs) as one line, like every
    other error, instead of a boxed usage panel."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # the help text itself, for a bare `chunkkv`
                raise
            _usage_error(err)


def _usage_error(err) -> None:
    where = err.ctx.command_path if err.ctx is not None else "chunkkv"
    _stderr.print(f"[bold red]error:[/] {escape(err.format_message())} (see {where} --help)",
                  highlight=False, soft_wrap=True)  # fmt: skip
    raise typer.Exit(2) from None


class Group(_OneLineUsageErrors, TyperGroup):
    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except UsageError as err:
            _usage_error(err)


# Options whose value may be left out, and the value they then take (Typer cannot declare such an option).
OPTIONAL_VALUES = {"--ray": "local"}


def fill_optional_values(args: list[str]) -> list[str]:
    """`--ray` followed by nothing or by another option becomes `--ray local`; `--` ends the options."""
    filled = []
    for i, arg in enumerate(args):
        filled.append(arg)
        if arg == "--":
            return filled + args[i + 1:]
        if arg in OPTIONAL_VALUES and (i + 1 == len(args) or args[i + 1].startswith("-")):
            filled.append(OPTIONAL_VALUES[arg])
    return filled


class Command(_OneLineUsageErrors, TyperCommand):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, fill_optional_values(list(args)))


app = typer.Typer(
    name="chunkkv",
    help="Long-document inference with a compressed KV cache (ChunkKV and baselines).",
    cls=Group,
    context_settings=CONTEXT_SETTINGS,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
)


def _fail(message: str, code: int) -> None:
    _stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly_errors(command: Callable) -> Callable:
    """Known failures become `error: ...` and an exit code; CHUNKKV_DEBUG=1 shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        if os.environ.get("CHUNKKV_DEBUG"):
            return command(*args, **kwargs)
        try:
            return command(*args, **kwargs)
        except ChunkKVError as err:
            _fail(str(err), err.exit_code)
        except MemoryError:
            _fail("out of CPU memory: try a smaller --seq, --batch or a lower --ratio", 1)
        except RuntimeError as err:
            if "out of memory" in str(err).lower():
                _fail("CUDA out of memory: try a smaller --seq, --batch or a lower --ratio/--budget", 1)
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"chunkkv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Long-document inference with a compressed KV cache (ChunkKV and baselines)."""


def _register() -> None:
    from chunkkv_cli.commands import ask, batch, bench, compress, memory, methods, profiles
    from chunkkv_cli.commands import eval as eval_cmd
    from chunkkv_cli.commands import inspect as inspect_cmd

    for name, fn, epilog in [
        ("memory", memory.memory, memory.EXAMPLES),
        ("profiles", profiles.profiles, None),
        ("methods", methods.methods, methods.EXAMPLES),
        ("ask", ask.ask, ask.EXAMPLES),
        ("compress", compress.compress, compress.EXAMPLES),
        ("inspect", inspect_cmd.inspect, inspect_cmd.EXAMPLES),
        ("bench", bench.bench, bench.EXAMPLES),
        ("eval", eval_cmd.eval_command, eval_cmd.EXAMPLES),
        ("batch", batch.batch, batch.EXAMPLES),
    ]:
        app.command(name, epilog=epilog, cls=Command, context_settings=CONTEXT_SETTINGS)(friendly_errors(fn))


_register()


def main() -> None:
    app(prog_name="chunkkv")


if __name__ == "__main__":
    sys.exit(main())
