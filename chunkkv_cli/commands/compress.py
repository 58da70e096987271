"""`chunkkv compress`: prefill a document once and save its compressed KV cache (.ckv) for later questions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from chunkkv_cli.api import QUESTION_ROOM, load
from chunkkv_cli.commands.common import mib, progress_bar, progress_hooks, read_text
from chunkkv_cli.commands.options import (
    DEFAULT_MODEL,
    BudgetOpt,
    ChunkSizeOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    PrefillBlockOpt,
    method_name,
    MethodOpt,
    ParamOpt,
    ModelOpt,
    RatioOpt,
    ReuseOpt,
    TruncateOpt,
    TrustRemoteCodeOpt,
    WindowOpt,
    require_reusable,
)
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.options import Compression, ModelSpec

EXAMPLES = """[b]Examples[/b]

  chunkkv compress samples/lighthouse.md -o lighthouse.ckv --ratio 0.2

  chunkkv ask lighthouse.ckv "Who repaired the lens in 1911?"

  chunkkv compress report.md -o report.ckv --method snapkv --budget 1024 --model ~/models/Qwen2.5-7B-Instruct --json

The question is not known here, so the observation window that scores the tokens is the document's tail
(its last --window prompt tokens: the end of the text, </document> and 'Question:').
"""

def compress(
    document: Annotated[str, typer.Argument(help="Text or markdown file, or - for standard input.")],
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="The cache file to write, ending in .ckv.", show_default="DOCUMENT.ckv"),
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    method: MethodOpt = None,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    chunk_size: ChunkSizeOpt = None,
    window: WindowOpt = 32,
    reuse_layers: ReuseOpt = 1,
    params: ParamOpt = None,
    truncate: TruncateOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    prefill_block: PrefillBlockOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Prefill a document once and save its compressed KV cache, for `chunkkv ask DOC.ckv "question"`."""
    spec = ModelSpec(model, device, dtype, trust_remote_code, prefill_block)
    compression = Compression(method_name(method, question_known=False), ratio, budget, window, chunk_size, reuse_layers,
                              params=tuple(params or ()))  # fmt: skip
    require_reusable(compression.compressor(), "compress")
    out = output_path(document, output)
    text = read_text(document)
    with progress_bar(Console(stderr=True), json_out) as progress:
        task = progress.add_task("loading model", total=None)
        llm = load(spec)
        hooks = progress_hooks(progress, task)
        cache = llm.compress(text, compression, truncate, QUESTION_ROOM, hooks, source_name(document))
        progress.update(task, description=f"writing {out.name}", total=None)
        size = cache.save(out)
    report = _report(out, llm.name, cache.meta, cache.prefix, size)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(_summary(report))


def output_path(document: str, output: Path | None) -> Path:
    """The .ckv to write: --output, else the document's path with .ckv; its folder must exist."""
    if document.endswith(".ckv"):
        raise ChunkKVError(f"{document} is already a compressed cache; give the text document")
    if output is None:
        if document == "-":
            raise ChunkKVError("--output is required when the document comes from standard input")
        output = Path(document).with_suffix(".ckv")
    if output.suffix != ".ckv":
        raise ChunkKVError(f"--output must end in .ckv (ask recognises caches by it), got {output}")
    from chunkkv_cli.outputs import check_output_file

    check_output_file(output, "--output")
    return output


def source_name(document: str) -> str:
    return "standard input" if document == "-" else Path(document).name


def _report(out: Path, model_name: str, meta: dict, prefix, size: int) -> dict:
    kept = prefix.kept_lengths()
    return {
        "output": str(out),
        "model": model_name,
        "method": meta["method"]["name"],
        "params": meta["method"]["params"],
        "prefix_tokens": prefix.prefix_len,
        "kept_tokens": sum(kept) / len(kept),
        "full_kv_bytes": prefix.full_bytes,
        "kept_kv_bytes": prefix.kept_bytes(),
        "file_bytes": size,
        "prefill_seconds": prefix.prefill_seconds,
        "compress_seconds": prefix.compress_seconds,
    }


def _summary(r: dict) -> str:
    return (
        f"saved {r['output']}: {r['prefix_tokens']} prompt tokens → {r['kept_tokens']:.0f} kept per layer "
        f"({r['method']}) · KV {mib(r['full_kv_bytes'])} → {mib(r['kept_kv_bytes'])} · "
        f"{mib(r['file_bytes'])} on disk · prefill {r['prefill_seconds']:.2f} s "
        f"(compression {r['compress_seconds'] * 1000:.0f} ms)"
    )
