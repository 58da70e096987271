"""`chunkkv methods`: the registered compression methods, what each does and what it needs (from the registry)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from chunkkv_cli.commands.options import JsonOpt

EXAMPLES = """[b]Examples[/b]

  chunkkv methods

  chunkkv methods --json

  chunkkv methods --markdown      (the table in the README)

  chunkkv methods kvzip           (one method: what it does and its parameters, for --param KEY=VALUE)
"""


def methods(
    name: Annotated[Optional[str], typer.Argument(help="One method: print its description and parameters.")] = None,
    json_out: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table (the README's).")] = False,
) -> None:
    """List the compression methods: name, what it keeps, and its capabilities (what the engine asks of it)."""
    rows = method_rows()
    if name is not None:
        typer.echo(method_help(name))
    elif json_out:
        typer.echo(json.dumps(rows, indent=2))
    elif markdown:
        typer.echo(markdown_table(rows))
    else:
        Console().print(_table(rows))


def method_rows() -> list[dict]:
    """One row per registered method: name, the first line of its class docstring, its capabilities."""
    from chunkkv_cli.compress import METHODS

    return [
        {"name": name, "description": (cls.__doc__ or "").strip().splitlines()[0], "capabilities": asdict(cls.caps),
         "parameters": cls.parameters()}
        for name, cls in METHODS.items()
    ]  # fmt: skip


def method_help(name: str) -> str:
    """A method's docstring (summary, source, parameters with defaults) and its capabilities."""
    import inspect

    from chunkkv_cli.compress import method_class

    cls = method_class(name)
    return f"{name}: {inspect.cleandoc(cls.__doc__ or '')}\n\ncapabilities: {capability_list({'capabilities': asdict(cls.caps)})}"


def capability_list(row: dict) -> str:
    return ", ".join(name for name, on in row["capabilities"].items() if on)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | what it does | capabilities |", "|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['description']} | {capability_list(r)} |" for r in rows]
    return "\n".join(lines)


def _table(rows: list[dict]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, caption="capabilities: see docs/architecture.md")
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("what it does", overflow="fold")
    table.add_column("capabilities", overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["description"], capability_list(r))
    return table
