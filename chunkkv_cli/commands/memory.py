"""`chunkkv memory`: KV-cache size by the paper's formula and for real (GQA), and what fits on a GPU."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from chunkkv_cli.commands.options import BudgetOpt, JsonOpt, ModelOpt, RatioOpt
from chunkkv_cli.errors import ChunkKVError

EXAMPLES = """[b]Examples[/b]

  chunkkv memory --model llama3-8b --seq 2048

  chunkkv memory --model llama3.1-8b --seq 128k --ratio 0.1 --gpu-mem 141GB

  chunkkv memory --model qwen2.5-7b --seq 32k --budget 1024 --batch 8 --json

  chunkkv memory --model smollm2-135m --seq 4k --measure

  chunkkv memory --model llama3-70b --seq 32k --dtype bf16 --gpus 2 --gpu-mem 141GB
"""


class DType(str, Enum):
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"
    fp8 = "fp8"


def memory(
    model: ModelOpt = "llama3-8b",
    seq: Annotated[str, typer.Option("--seq", "-s", help="Prompt length in tokens: 2048, 32k, 128k, 1M.")] = "32k",
    batch: Annotated[int, typer.Option("--batch", help="Sequences decoded together.")] = 1,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    dtype: Annotated[DType, typer.Option("--dtype", help="Bytes per cached value and per weight.")] = DType.fp16,
    gpu_mem: Annotated[
        str, typer.Option("--gpu-mem", help="GPU memory: 80GB (10^9 bytes), 80GiB (2^30 bytes), 141G.")
    ] = "80GB",
    gpus: Annotated[
        int,
        typer.Option(
            "--gpus",
            help="GPUs the layers are split over (as `--device auto` does): weights and KV per GPU; --gpu-mem is each GPU's.",
        ),
    ] = 1,
    prefill_block: Annotated[
        Optional[int],
        typer.Option("--prefill-block", help="Tokens per prefill block the activations are counted at.",
                     show_default="8192, or the prompt if shorter"),
    ] = None,
    measure: Annotated[
        bool, typer.Option("--measure", help="Also build the cache for real (random weights) and count its bytes.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """KV-cache memory: the ChunkKV paper's formula, the real GQA size, the compressed size, what fits on a GPU."""
    from chunkkv_cli.memory import memory_report
    from chunkkv_cli.profiles import load_profile

    if batch < 1:
        raise ChunkKVError(f"--batch must be a positive number of sequences, got {batch}")
    profile = load_profile(model)
    report = memory_report(profile, seq, batch, ratio, budget, dtype.value, gpu_mem, gpus, prefill_block)
    if measure:
        report["measured"] = measure_cache(profile, report)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report, gpu_mem)


def measure_cache(profile, report: dict) -> dict:
    """Prefill a random-weight model of the profile's attention shape and count the cache bytes."""
    try:
        from chunkkv_cli.model import measure_kv_bytes
    except ModuleNotFoundError as err:
        raise ChunkKVError(f"--measure is unavailable: {err}", exit_code=1) from None
    return measure_kv_bytes(
        profile, report["seq"], report["batch"], report["dtype"], ratio=report["ratio"], budget=report["budget"]
    )


def print_report(report: dict, gpu_mem: str) -> None:
    from chunkkv_cli.memory import human_bytes

    console = Console()
    heads, kv_heads, dtype = report["num_attention_heads"], report["num_kv_heads"], report["dtype"]
    rule = f"ratio {report['ratio']}" if report["budget"] is None else f"budget {report['budget']}"
    sizes = Table(title=f"{report['model']} KV cache: {report['seq']:,} tokens x batch {report['batch']}, {dtype}")
    for column, justify in (("quantity", "left"), ("bytes", "right"), ("size", "right")):
        sizes.add_column(column, justify=justify)
    rows = [
        (f"paper Eq. 1 ({heads} heads, fp16)", report["paper_bytes"]),
        (f"stored ({kv_heads} KV heads, {dtype})", report["gqa_bytes"]),
        (f"compressed ({rule}: {report['kept_tokens']:,} tokens)", report["compressed_bytes"]),
        (f"saved ({report['saved_fraction']:.1%})", report["saved_bytes"]),
        ("compressed, prefill peak", report["compressed_peak_bytes"]),
        (f"weights ({report['param_count'] / 1e9:.2f} B params)", report["weight_bytes"]),
        (f"prefill activations (blocks of {report['prefill_block']:,})", report["activation_bytes"]),
        ("prefill peak (weights + cache + activations)", report["prefill_peak_bytes"]),
    ]
    measured = report.get("measured")
    if measured:
        where = f"{measured['device']}, {measured['seq']:,} tokens"
        rows += [
            (f"measured full ({where})", measured["full_bytes"]),
            (f"measured compressed ({where})", measured["compressed_bytes"]),
        ]
    for label, n_bytes in rows:
        sizes.add_row(label, f"{n_bytes:,}", human_bytes(n_bytes))
    console.print(sizes)
    if report["gpus"] > 1:
        console.print(gpus_table(report, gpu_mem))
    console.print(fits_table(report, gpu_mem))
    for line in explanation(report):
        console.print(line, highlight=False)
    if report["gpus"] > 1:
        console.print(gpus_verdict(report, gpu_mem), highlight=False)
    if measured:
        console.print(f"Measured: {measured['note']}.", highlight=False)


def explanation(report: dict) -> list[str]:
    lines = [
        report["why_paper_differs"],
        "Compressed limits count the prefill peak: earlier layers already compressed, one layer at full length.",
        f"Compressed prefill adds the activations of a prefill in blocks of {report['prefill_block']:,} tokens: "
        "the hidden state, one block's MLP, the window's scores.",
    ]
    if report["sliding_layers"]:
        lines.append(
            f"{report['sliding_layers']} of {report['num_layers']} layers slide over {report['sliding_window']:,} tokens: "
            "they cache their window (as the model defines it) and are not compressed; the ratio applies to the "
            f"{report['full_attention_layers']} full-attention layers."
        )
    context = report["max_context"]
    if max(report["seq"], report["max_seq_full"], report["max_seq_compressed"]) > context:
        lines.append(f"* beyond {report['model']}'s {context:,}-token context.")
    return lines


def fits_table(report: dict, gpu_mem: str) -> Table:
    where = gpu_mem if report["gpus"] == 1 else f"{report['gpus']} x {gpu_mem}"
    fits = Table(title=f"What fits in {where} (weights included; activations in the last column)")
    for column in ("limit", "full cache", "compressed", "compressed prefill"):
        fits.add_column(column, justify="left" if column == "limit" else "right")
    fits.add_row(
        f"batch at {tokens_within_context(report['seq'], report['max_context'])} tokens",
        f"{report['max_batch_full']:,}",
        f"{report['max_batch_compressed']:,}",
        f"{report['max_batch_prefill']:,}",
    )
    fits.add_row(
        f"prompt tokens at batch {report['batch']}",
        *(tokens_within_context(report[key], report["max_context"])
          for key in ("max_seq_full", "max_seq_compressed", "max_seq_prefill")),
    )  # fmt: skip
    return fits


def tokens_within_context(n_tokens: int, max_context: int) -> str:
    """'487,819*' when the length lies beyond the model's context."""
    return f"{n_tokens:,}" + ("*" if n_tokens > max_context else "")


def gpus_table(report: dict, gpu_mem: str) -> Table:
    """One row per GPU: its layers, weights, KV (full and compressed) and what it holds with each cache."""
    from chunkkv_cli.memory import human_bytes

    table = Table(title=f"Split by layer over {report['gpus']} GPUs of {gpu_mem} each (batch {report['batch']})")
    for column in ("GPU: layers", "weights", "KV full", "KV compressed", "with full", "with compressed"):
        table.add_column(column, justify="left" if column == "GPU: layers" else "right")
    for share in report["per_gpu"]:
        weights = share["weight_bytes"]
        table.add_row(
            f"{share['gpu']}: {share['first_layer']}-{share['last_layer']}",
            human_bytes(weights),
            human_bytes(share["full_kv_bytes"]),
            human_bytes(share["compressed_kv_bytes"]),
            fits_cell(weights + share["full_kv_bytes"], share["fits_full"]),
            fits_cell(weights + share["compressed_peak_bytes"], share["fits_compressed"]),
        )
    return table


def fits_cell(n_bytes: int, fits: bool) -> str:
    from chunkkv_cli.memory import human_bytes

    return human_bytes(n_bytes) if fits else f"[red]{human_bytes(n_bytes)}[/]"


def gpus_verdict(report: dict, gpu_mem: str) -> str:
    """'Fits on every GPU: full cache yes, compressed yes.' for `memory --gpus`."""
    word = {True: "yes", False: "no"}
    longest = ", ".join(
        f"GPU {share['gpu']} {tokens_within_context(share['max_seq_prefill'], report['max_context'])}"
        for share in report["per_gpu"]
    )
    return (
        f"Weights + KV on every GPU within {gpu_mem}: full cache {word[report['fits_full']]}, compressed "
        f"{word[report['fits_compressed']]} ('with compressed' counts the prefill peak). Layers in equal "
        "contiguous blocks, embeddings on the first GPU, the final norm and lm_head on the last.\n"
        f"Longest prompt whose compressed prefill fits, activations included: {longest} tokens."
    )
