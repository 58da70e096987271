"""`chunkkv bench`: prefill, compression, decode and memory, with and without layer-wise index reuse."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from chunkkv_cli.commands.options import (
    BudgetOpt, ChunkSizeOpt, DeviceOpt, JsonOpt, OffloadOpt, ParamOpt, PrefillBlockOpt, RatioOpt, WindowOpt,
)  # fmt: skip
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.options import Compression, ModelSpec
from chunkkv_cli.registry import REFERENCE

EXAMPLES = """[b]Examples[/b]

  chunkkv bench --reuse-layers 2                         (GPU: llama3-8b shape at 8k and 32k, random weights)

  chunkkv bench --model qwen2.5-7b --seq 32k --reuse-layers 1,2,4 --batch 1,max --json > qwen.json

  chunkkv bench --seq 8k --decode-tokens 1024 --plot reuse.png   (the paper's end-to-end shape)

  chunkkv bench --seq 32k --reuse-layers 1 --decoder hf,fast      (the two decoders on one cache size)
"""

GPU_DEFAULTS = {"model": "llama3-8b", "seq": "8k,32k", "decode_tokens": 128, "repeats": 3}
CPU_DEFAULTS = {"model": "smollm2-135m", "seq": "1k", "decode_tokens": 16, "repeats": 2}


def bench(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Profile or path.", show_default="llama3-8b on GPU, smollm2-135m on CPU")] = None,
    seq: Annotated[Optional[str], typer.Option(help="Prompt lengths, comma-separated (e.g. 8k,32k).", show_default="8k,32k on GPU, 1k on CPU")] = None,
    method: Annotated[str, typer.Option(help="Compression method compared with fullkv.")] = "chunkkv",
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    reuse_layers: Annotated[str, typer.Option(help="Reuse group sizes to time, comma-separated; 1 (no reuse) is always added.")] = "2",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated; 'max' searches the largest that fits.")] = "1",
    decode_tokens: Annotated[Optional[int], typer.Option(help="Decode steps timed.", show_default="128 on GPU, 16 on CPU")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Timed runs per row (median reported), after one warm-up.")] = None,
    decoder: Annotated[Optional[str], typer.Option(help="Decoders to time, comma-separated: hf, fast, compiled.", show_default="hf,fast on a GPU, hf on the CPU")] = None,
    offload: OffloadOpt = None,
    share_prompt: Annotated[bool, typer.Option(help="Prefill one sequence and copy its cache to the whole --batch (decode timing where a batched prefill would not fit; prefill figures are then per sequence).")] = False,
    random_weights: Annotated[bool, typer.Option(help="Random weights of the profile's shape (default when it has no weights).")] = False,
    window: WindowOpt = 32,
    chunk_size: ChunkSizeOpt = None,
    params: ParamOpt = None,
    device: DeviceOpt = "auto",
    prefill_block: PrefillBlockOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp16, bf16 or fp32.", show_default="bf16 on GPU, fp32 on CPU")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the JSON results to this file.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Draw latency and throughput vs reuse layers to this PNG.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Time prefill (TTFT), compression, decode and peak memory for fullkv vs a method, with and without index reuse."""
    from chunkkv_cli.model import resolve_device

    torch_device = resolve_device(device)
    defaults = GPU_DEFAULTS if torch_device.type == "cuda" else CPU_DEFAULTS
    compression = Compression(method, ratio, budget, window, chunk_size, offload=offload, params=tuple(params or ()))
    plan = Plan(
        seqs=_sizes(seq or defaults["seq"]), reuse=_ints(reuse_layers, "--reuse-layers"), batches=_batches(batch),
        decode_tokens=_given_or(decode_tokens, defaults["decode_tokens"]),
        repeats=_given_or(repeats, defaults["repeats"]), share_prompt=share_prompt,
    )  # fmt: skip
    _check_outputs(out, plot)
    compression.compressor()  # the method's own checks, before loading anything
    default_decoders = "hf,fast" if torch_device.type == "cuda" and not offload else "hf"
    spec = ModelSpec(model or defaults["model"], str(torch_device), dtype or "auto", prefill_block=prefill_block)
    report = measure(spec, compression, plan, decoder or default_decoders, random_weights)
    if out:
        out.write_text(json.dumps(report, indent=2))
    if plot:
        from chunkkv_cli.bench import plot_report

        plot_report(report, plot)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    _render(Console(), report)


def _given_or(value: int | None, default: int) -> int:
    """The device's default where not given; a given 0 stays (and is refused), it is not a default."""
    return default if value is None else value


def _check_outputs(out: Path | None, plot: Path | None) -> None:
    """Folders for --out and --plot exist and take files before anything is measured (nothing is lost at the end)."""
    from chunkkv_cli.outputs import check_output_file

    for path, flag in ((out, "--out"), (plot, "--plot")):
        if path is not None:
            check_output_file(path, flag, create_folder=True)


@dataclass(frozen=True)
class Plan:
    """What the bench measures: prompt lengths, reuse group sizes, batches, and how long and how often."""

    seqs: list[int]
    reuse: list[int]
    batches: list
    decode_tokens: int
    repeats: int
    share_prompt: bool = False

    def __post_init__(self) -> None:
        if self.decode_tokens < 1 or self.repeats < 1:
            raise ChunkKVError("--decode-tokens and --repeats must be at least 1")


def measure(spec: ModelSpec, compression: Compression, plan: Plan, decoders: str, random_weights: bool) -> dict:
    """Load the model and time every case of the plan; the report that --json prints."""
    import torch

    from chunkkv_cli.bench import environment, plan_cases, run_bench
    from chunkkv_cli.model import load_model

    err = Console(stderr=True)
    device = torch.device(spec.device)
    if device.type == "cpu":
        err.print("[yellow]no GPU: timing on the CPU at small lengths; GPU figures need a CUDA device[/]")
    dtype = None if spec.dtype == "auto" else spec.dtype
    loaded = load_model(spec.model, spec.device, dtype, random_weights=random_weights, allow_random=True)
    spec.configure(loaded.model)
    _check_lengths(plan.seqs, loaded.profile, random=loaded.tokenizer is None, console=err)
    cases = plan_cases(compression.method, plan.seqs, plan.reuse, plan.batches, _decoders(decoders, device))
    with err.status("") as status:
        rows = run_bench(
            loaded.model, cases, compression, plan.decode_tokens, plan.repeats,
            on_case=lambda c: status.update(f"[{cases.index(c) + 1}/{len(cases)}] {c.label} · {c.seq} tokens · batch {c.batch}"),
            share_prompt=plan.share_prompt,
        )
    settings = {"method": compression.method, **compression.settings(), "decode_tokens": plan.decode_tokens,
                "repeats": plan.repeats, "share_prompt": plan.share_prompt}  # fmt: skip
    return {
        "environment": environment(device),
        "model": loaded.profile.name,
        "random_weights": loaded.tokenizer is None,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "settings": settings,
        "rows": rows,
    }


def _sizes(text: str) -> list[int]:
    from chunkkv_cli.memory import parse_size

    return [parse_size(part.strip()) for part in text.split(",") if part.strip()]


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ChunkKVError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ChunkKVError(f"{flag} values must be at least 1, got {text!r}")
    return values


def _batches(text: str) -> list:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    numbers = [p for p in parts if p != "max"]
    batches: list = _ints(",".join(numbers), "--batch") if numbers else []
    if "max" in parts:
        batches.append("max")
    if not batches:
        raise ChunkKVError(f"--batch takes sizes and/or 'max', got {text!r}")
    return batches


def _decoders(text: str, device) -> list[str]:
    from chunkkv_cli.generate import DECODERS, resolve_decoder

    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [n for n in names if n not in DECODERS]
    if unknown or not names:
        raise ChunkKVError(f"--decoder takes {', '.join(DECODERS)} (comma-separated), got {text!r}")
    return list(dict.fromkeys(resolve_decoder(n, device) for n in names))


def _check_lengths(seqs: list[int], profile, random: bool, console: Console) -> None:
    """Beyond the context is an error with real weights; with random weights it is timing only."""
    too_long = [s for s in seqs if s > profile.max_context]
    if too_long and not random:
        raise ChunkKVError(
            f"--seq {too_long[0]} is longer than {profile.name}'s context of {profile.max_context} tokens"
        )
    if too_long:
        console.print(f"[yellow]{too_long[0]} tokens exceeds {profile.name}'s {profile.max_context}-token context: "
                      "random weights, so this times the shape only[/]")


def _render(console: Console, report: dict) -> None:
    env = report["environment"]
    console.print(
        f"[b]{report['model']}[/b] ({'random weights, ' if report['random_weights'] else ''}{report['dtype']}) on "
        f"{env['device']} · torch {env['torch']} · transformers {env['transformers']}"
    )
    groups = {}
    for row in report["rows"]:
        groups.setdefault((row["seq"], row["batch_kind"]), []).append(row)
    for (seq, kind), rows in groups.items():
        console.print(_table(seq, kind, rows))


def _table(seq: int, kind: str, rows: list[dict]) -> Table:
    """Ten short columns that fit 100 terminal columns; every other figure is in --json."""
    title = f"{seq:,} tokens · {'largest batch that fits' if kind == 'max' else 'fixed batch'}"
    table = Table(title=title, title_justify="left", caption=BENCH_CAPTION, caption_justify="left",
                  box=None, header_style="bold underline", pad_edge=False, collapse_padding=True)  # fmt: skip
    for name in ("method", "batch", "TTFT\ns", "compress\nms (share)", "ms/token\n(floor)", "tok/s", "peak GiB\npre/dec",
                 "KV\nGiB", "tok/s\nvs full", "TTFT vs\nreuse 1"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in rows:
        table.add_row(*_cells(r))
    return table


BENCH_CAPTION = "More figures (end-to-end time, decoder setup, bandwidth, ratios) with --json."


def _cells(r: dict) -> list[str]:
    if "prefill_s" not in r:
        return [_label(r), "0", *["—"] * 8]
    floor = r.get("floor_ms_per_token")
    vs_full, vs_reuse = r.get("vs_fullkv"), r.get("vs_no_reuse")
    return [
        _label(r),
        str(r["batch"]),
        f"{r['prefill_s']:.3f}",
        f"{1000 * r['compress_s']:.1f} ({r['compress_s'] / r['prefill_s']:.1%})",
        f"{r['decode_ms_per_token']:.2f}" + (f" ({floor:.2f})" if floor else ""),
        f"{r['decode_tokens_per_s']:.0f}",
        f"{_gib(r['peak_prefill_bytes'], 1)}/{_gib(r['peak_decode_bytes'], 1)}",
        _gib(r["kv_bytes"]),
        f"×{vs_full['decode_tokens_per_s']:.2f}" if vs_full and r["method"] != REFERENCE else "—",
        f"×{vs_reuse['prefill']:.3f}" if vs_reuse and r["reuse_layers"] > 1 else "—",
    ]


def _label(row: dict) -> str:
    reuse = f" r{row['reuse_layers']}" if row["method"] != REFERENCE else ""
    return f"{row['method']}{reuse} {row.get('decoder', 'hf')}"


def _gib(n, digits: int = 2) -> str:
    return "n/a" if n is None else f"{n / 2**30:.{digits}f}"
