"""Options shared by several commands, so each is spelled and documented once."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from chunkkv_cli import registry
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.options import DEFAULT_MODEL  # noqa: F401  (the commands' default, beside their flags)

# The registered methods as Typer choices.
Method = Enum("Method", {name: name for name in registry.names()}, type=str)
MethodOpt = Annotated[
    Optional[Method],
    typer.Option(
        help="KV compression method (`chunkkv methods`).",
        show_default=f"{registry.DEFAULT} when the question is in the prompt, {registry.QUESTION_AGNOSTIC_DEFAULT} "
        "when the document is compressed before its questions",
    ),
]


def method_name(method, question_known: bool) -> str:
    """--method, or the default for a prompt that does (or does not yet) hold the question."""
    if method is not None:
        return method.value
    return registry.DEFAULT if question_known else registry.QUESTION_AGNOSTIC_DEFAULT

ParamOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--param",
        "-p",
        metavar="K=V",
        help="A parameter of the method, KEY=VALUE; repeat for more (`chunkkv methods NAME` lists them), "
        "e.g. -p reach=1024.",
    ),
]

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Profile name (see `chunkkv profiles`), a profile .yaml, a local Hugging Face folder or a .gguf file.",
    ),
]
RatioOpt = Annotated[
    Optional[float],
    typer.Option("--ratio", "-r", help="Fraction of context tokens kept, in (0, 1]: 0.1 keeps 10 % of the KV cache.", show_default="0.1 unless --budget"),
]
BudgetOpt = Annotated[
    Optional[int],
    typer.Option("--budget", "-b", help="Tokens kept per layer (window included); overrides --ratio."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (every visible GPU, layers spread over them; else the CPU), cpu, cuda or cuda:N.")
]
WindowOpt = Annotated[int, typer.Option("--window", help="Observation window: the last W prompt tokens score the rest.")]
ChunkSizeOpt = Annotated[
    Optional[int],
    typer.Option("--chunk-size", help="Tokens per chunk kept or dropped together.",
                 show_default="the method's own: 10 for chunkkv, 1 for kvzip"),
]
ReuseOpt = Annotated[
    int,
    typer.Option("--reuse-layers", help="ChunkKV layer-wise index reuse: layers per group sharing one selection (1 = off)."),
]
TruncateOpt = Annotated[bool, typer.Option(help="Cut the document to fit the context instead of failing.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")]
PrefillBlockOpt = Annotated[
    Optional[int],
    typer.Option("--prefill-block", help="Tokens per block each layer's prefill runs over (less memory for long documents).",
                 show_default="the largest that fits in free GPU memory, up to 8192; none on the CPU"),
]
TrustRemoteCodeOpt = Annotated[bool, typer.Option(help="Allow code shipped in a model folder to run.")]

DecoderOpt = Annotated[
    str,
    typer.Option(
        help="auto (hf on the CPU, compiled on a GPU), hf (a transformers forward per token), fast (static cache, "
        "split-KV attention kernel, one CUDA graph per step, no compile) or compiled (fast with each layer compiled "
        "by Inductor: steps near the bandwidth floor after a one-time compile, 5-12 s for an 8B model, printed and "
        "kept in ~/.cache/chunkkv/inductor for later runs).",
    ),
]


def small_budget_warning(compressor, n_tokens: int) -> str | None:
    """A warning when the method would keep fewer tokens than its observation window (the output is then noise)."""
    window = getattr(compressor, "window", None)
    if compressor.keeps_whole(n_tokens):
        return f"the {n_tokens}-token prompt is too short for {compressor.name} to choose from: it is kept whole"
    if not compressor.caps.evicts or window is None:
        return None
    n_kept = compressor.kept_tokens(n_tokens)
    if n_kept >= min(window, n_tokens):
        return None
    return (f"keeping {n_kept} of {n_tokens} prompt tokens, fewer than the {window}-token observation window: "
            "answers will be poor; raise --ratio or --budget, or lower --window")


MaxNewTokensOpt = Annotated[int, typer.Option(help="Most tokens to generate per answer.")]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy; above 0 samples.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling threshold (with --temperature).")]

OffloadOpt = Annotated[
    Optional[str],
    typer.Option(help="clusterkv only: 'cpu' keeps the clustered prompt K/V in pinned host memory and copies in "
                 "the selected tokens at each step (hf decoder)."),
]


def require_reusable(compressor, where: str) -> None:
    """Compress-once paths need a method whose compressed document serves later questions."""
    if not compressor.caps.reusable:
        raise ChunkKVError(
            f"{where} compresses a document once for later questions, and --method {compressor.name} cannot "
            f"(it selects at every decode step): use `chunkkv ask DOC QUESTION --method {compressor.name}`"
        )
