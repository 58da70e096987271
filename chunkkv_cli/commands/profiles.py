"""`chunkkv profiles`: the model profiles `--model` accepts by name."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from chunkkv_cli.commands.options import JsonOpt


def profiles(json_out: JsonOpt = False) -> None:
    """List the model profiles: architecture, context length, parameter count and weights source."""
    from chunkkv_cli.profiles import list_profiles, profiles_dir

    found = list_profiles()
    if json_out:
        typer.echo(json.dumps([{**asdict(p), "param_count": p.param_count()} for p in found], indent=2))
        return
    table = Table(
        title=f"Profiles in {profiles_dir()}",
        caption="heads: attention/KV heads; dim: head dim; context: max tokens",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("name / hf id", overflow="fold")
    for column in ("layers", "heads", "dim", "context", "params"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("weights", overflow="fold")
    for p in found:
        table.add_row(
            f"[bold]{p.name}[/]\n[dim]{p.hf_id}[/]",
            str(p.num_layers),
            f"{p.num_attention_heads}/{p.num_kv_heads}",
            str(p.head_dim),
            f"{p.max_context:,}",
            f"{p.param_count() / 1e9:.2f} B",
            p.weights,
        )
    Console().print(table)
