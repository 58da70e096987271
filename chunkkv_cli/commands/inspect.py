"""`chunkkv inspect`: what a saved .ckv cache holds, without loading a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from chunkkv_cli.commands.common import mib
from chunkkv_cli.commands.options import JsonOpt

EXAMPLES = """[b]Examples[/b]

  chunkkv inspect lighthouse.ckv

  chunkkv inspect lighthouse.ckv --json
"""


def inspect(
    cache: Annotated[Path, typer.Argument(help="A .ckv file written by `chunkkv compress`.")],
    json_out: JsonOpt = False,
) -> None:
    """Show a saved cache's metadata, per-layer kept lengths and size on disk (its checksum is verified)."""
    from chunkkv_cli.cache_io import read

    meta, prefix = read(cache)
    report = {
        **meta,
        "file_bytes": cache.stat().st_size,
        "kept_kv_bytes": prefix.kept_bytes(),
        "kept_per_layer": prefix.kept_lengths(),
        "per_head": prefix.positions[0].dim() == 3 or prefix.head_lengths is not None,
    }
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    Console().print(_table(cache, report))
    typer.echo(f"kept per layer: {' '.join(map(str, report['kept_per_layer']))}")


def _table(path: Path, r: dict) -> Table:
    kept, model, method, doc = r["kept_per_layer"], r["model"], r["method"], r["document"]
    params = ", ".join(f"{k}={v}" for k, v in method["params"].items() if v is not None)
    table = Table(title=str(path), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("size on disk", f"{mib(r['file_bytes'])} ({r['file_bytes']:,} bytes)"),
        ("format", f"{r['format']} v{r['format_version']} · chunkkv {r['chunkkv_version']} · {r['created']}"),
        ("model", f"{model['name']} ({model['spec']}) · {model['dtype']}"),
        ("model sha256", f"config {model['config_sha256'][:12]} · weights {model['weights_sha256'][:12]} · "
                         f"tokenizer {model['tokenizer_sha256'][:12]}"),
        ("method", f"{method['name']} ({params}) · reuse layers {method['reuse_layers']}"),
        ("scoring", method["scoring"]),
        ("document", f"{doc['source']} · {doc['chars']:,} chars · sha256 {doc['sha256'][:12]}"),
        ("prompt tokens", f"{r['prefix_tokens']:,} (a question continues at this position)"),
        ("kept per layer", f"min {min(kept)} · mean {sum(kept) / len(kept):.1f} · max {max(kept)} · "
                           f"{'per KV head' if r['per_head'] else 'shared by all heads'}"),
        ("KV bytes", f"{mib(r['full_kv_bytes'])} → {mib(r['kept_kv_bytes'])} over {r['layers']} layers"),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table
