"""`chunkkv eval`: needle, long-document QA, many-shot math and kept-index similarity over methods x ratios."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from chunkkv_cli.commands.options import (
    DEFAULT_MODEL,
    ChunkSizeOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    ParamOpt,
    ReuseOpt,
    WindowOpt,
)
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.registry import REFERENCE

EXAMPLES = """[b]Examples[/b]

  chunkkv eval needle --lengths 1k,2k,4k --depths 5 --ratios 0.1,0.2 --out eval-runs/needle

  chunkkv eval similarity --ratios 0.1 --limit 3 --out eval-runs/similarity

  chunkkv eval longqa --data longbench/qasper.jsonl --methods chunkkv,snapkv,fullkv --limit 50

  chunkkv eval manyshot --lengths 2k,4k --limit 10 --json

Rerun the same command with the same --out to resume an interrupted run.
"""

DEFAULT_METHODS = "chunkkv,snapkv,h2o,streamingllm,pyramidkv,fullkv"
DEFAULT_MAX_NEW_TOKENS = {"needle": 24, "longqa": 32, "manyshot": 64, "similarity": 1}
BUNDLED_SAMPLES = Path(__file__).resolve().parents[2] / "samples"
PAPER_NOTES = {
    "needle": "paper (NIAH, LLaMA-3.1-8B-Instruct, 128 kept tokens): ChunkKV 73.8 > PyramidKV 65.1 > "
    "SnapKV 58.9 > H2O 47.9 > StreamingLLM 23.7 (FullKV 74.6)",
    "longqa": "paper (LongBench, LLaMA-3-8B-Instruct, 10 % KV): FullKV 41.46 > ChunkKV 40.51 > SnapKV 40.15 > "
    "PyramidKV ≈40.1 > H2O 37.06 > StreamingLLM ≈35.7",
    "similarity": "paper (adjacent layers, LLaMA-3-8B-Instruct): ChunkKV 57.7 % > SnapKV 28.0 % > H2O 25.3 %",
}


class TaskEnum(str, Enum):
    needle = "needle"
    longqa = "longqa"
    manyshot = "manyshot"
    similarity = "similarity"


TaskArg = Annotated[TaskEnum, typer.Argument(help="needle, longqa, manyshot or similarity.")]
MethodsOpt = Annotated[str, typer.Option(help="Comma-separated methods to compare.")]
RatiosOpt = Annotated[str, typer.Option(help="Comma-separated fractions of the KV kept, each in (0, 1].")]
BudgetsOpt = Annotated[
    Optional[str],
    typer.Option(help="Comma-separated token budgets per layer (e.g. 1024), added to the grid beside --ratios; "
                 "pass --ratios '' for budgets only."),
]
LimitOpt = Annotated[
    Optional[int], typer.Option(help="At most N samples (manyshot: N questions, each at every length; default 10).")
]
DataOpt = Annotated[
    Optional[Path],
    typer.Option(
        help="longqa: JSONL, LongBench layout or context/question/answers; similarity: such a JSONL or a text "
        "file (both default to samples/lighthouse.md with its questions). manyshot: GSM8K JSONL (default: generated)."
    ),
]
HaystackOpt = Annotated[Optional[Path], typer.Option(help="needle: any text file to hide the needle in (default: generated prose).")]
NeedleOpt = Annotated[Optional[str], typer.Option(help="needle: the sentence to hide.")]
NeedleQuestionOpt = Annotated[Optional[str], typer.Option(help="needle: the question that asks for it.")]
NeedleAnswerOpt = Annotated[Optional[str], typer.Option(help="needle: the value a right answer contains.")]
LengthsOpt = Annotated[str, typer.Option(help="needle/manyshot: context lengths in tokens, e.g. 1k,2k,4k.")]
DepthsOpt = Annotated[int, typer.Option(help="needle: needle depths, evenly spaced from start (0 %) to end (100 %).")]
MaxNewOpt = Annotated[
    Optional[int], typer.Option(help="Most tokens per answer (default: needle 24, longqa 32, manyshot 64).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the generated haystack and arithmetic problems.")]
AgnosticOpt = Annotated[
    bool,
    typer.Option(help="needle, longqa: compress each document before its question is appended (as compress, "
                 "ask --questions and batch do), then ask."),
]


def _agnostic_task(agnostic: bool, task: str) -> bool:
    if agnostic and task not in ("needle", "longqa"):
        raise ChunkKVError(f"--question-agnostic is for needle and longqa, not {task}")
    return agnostic


def _method_params(params: list[str], methods: list[str]) -> list[str]:
    """--param pairs, each checked against the methods of the grid that take its key (one must)."""
    from chunkkv_cli.compress import method_class
    from chunkkv_cli.options import Compression, param_pair

    for pair in params:
        key = param_pair(pair)[0]
        takers = [m for m in methods if key in method_class(m).parameters()]
        if not takers:
            raise ChunkKVError(f"--param {pair}: none of the methods {', '.join(methods)} takes {key!r}")
        Compression(takers[0], params=(pair,)).compressor()  # the value's type, checked before any model loads
    return params


OutOpt = Annotated[Path, typer.Option(help="Folder for records.jsonl, results.json and plots; rerun to resume.")]


def eval_command(
    task: TaskArg,
    model: ModelOpt = DEFAULT_MODEL,
    methods: MethodsOpt = DEFAULT_METHODS,
    ratios: RatiosOpt = "0.05,0.1,0.2",
    budgets: BudgetsOpt = None,
    limit: LimitOpt = None,
    data: DataOpt = None,
    haystack: HaystackOpt = None,
    needle: NeedleOpt = None,
    needle_question: NeedleQuestionOpt = None,
    needle_answer: NeedleAnswerOpt = None,
    lengths: LengthsOpt = "1k,2k,4k",
    depths: DepthsOpt = 5,
    window: WindowOpt = 32,
    chunk_size: ChunkSizeOpt = None,
    reuse_layers: ReuseOpt = 1,
    max_new_tokens: MaxNewOpt = None,
    question_agnostic: AgnosticOpt = False,
    params: ParamOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("eval-out"),
    json_out: JsonOpt = False,
) -> None:
    """Compare KV compression methods on a task over a grid of ratios (one prefill per sample feeds them all)."""
    from chunkkv_cli.eval.runner import Settings

    task_name, names = task.value, parse_methods(methods, task.value)
    settings = Settings(
        task=task_name,
        model=model,
        methods=names,
        ratios=grid_values(ratios, budgets),
        window=_at_least(window, 1, "--window"),
        chunk_size=chunk_size if chunk_size is None else _at_least(chunk_size, 1, "--chunk-size"),
        reuse_layers=_at_least(reuse_layers, 1, "--reuse-layers"),
        max_new_tokens=_at_least(_or_default(max_new_tokens, task_name), 1, "--max-new-tokens"),
        question_agnostic=_agnostic_task(question_agnostic, task_name),
        params=_method_params(params or [], names),
    )
    raw, settings.source = read_task_data(
        task_name, data, haystack, needle_triple(needle, needle_question, needle_answer),
        limit if limit is None else _at_least(limit, 1, "--limit"), seed, parse_lengths(lengths), depth_list(depths),
    )  # fmt: skip
    check_out(out, settings)
    err = Console(stderr=True)
    loaded = _load_quietly(model, device, err)
    samples = make_samples(raw, loaded.tokenizer, loaded.profile.max_context - settings.max_new_tokens)
    _report(_run(loaded, samples, settings, out, err), err, json_out)


def _load_quietly(model: str, device: str, err: Console):
    with err.status("loading model", spinner="dots") if err.is_terminal else nullcontext():
        return _load(model, device)


def check_out(out: Path, settings) -> None:
    """--out is a writable folder whose earlier settings (if any) match, before the model loads."""
    from chunkkv_cli.eval.runner import check_settings
    from chunkkv_cli.outputs import check_writable_folder, make_folder

    make_folder(out, "--out")
    check_writable_folder(out, "--out")
    check_settings(out, settings)


def file_source(path: Path) -> dict:
    """A data file as part of the resume identity: its path and its content's sha256 (an edited file is new data)."""
    import hashlib

    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise ChunkKVError(f"cannot read {path}: {err.strerror or err}") from None
    return {"data": str(path), "sha256": digest}


def parse_methods(text: str, task: str) -> list[str]:
    from chunkkv_cli.compress import METHODS, methods_where

    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ChunkKVError(f"--methods: unknown method {', '.join(map(repr, unknown)) or '(none)'}; choose from {', '.join(METHODS)}")
    if task == "similarity":
        # a method that evicts nothing keeps every index: similarity 1 by definition
        names = [n for n in names if n in methods_where(evicts=True)]
        if not names:
            raise ChunkKVError(f"--methods: similarity needs a method that evicts ({', '.join(methods_where(evicts=True))})")
    return names


def grid_values(ratios: str, budgets: str | None) -> list[float]:
    """The grid's compression axis: fractions in (0, 1] and, as whole numbers above 1, token budgets."""
    values = parse_ratios(ratios) if ratios.strip() or not budgets else []
    for part in (budgets or "").split(","):
        if not part.strip():
            continue
        if not part.strip().isdigit() or int(part) < 2:
            raise ChunkKVError(f"--budgets: {part.strip()!r} is not a whole number of tokens above 1")
        values.append(float(int(part)))
    if not values:
        raise ChunkKVError("give --ratios or --budgets")
    return list(dict.fromkeys(values))


def parse_ratios(text: str) -> list[float]:
    ratios = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = float(part)
        except ValueError:
            raise ChunkKVError(f"--ratios: {part!r} is not a number; give fractions like 0.05,0.1,0.2") from None
        if not 0 < value <= 1:
            raise ChunkKVError(f"--ratios: {part} is outside (0, 1]; 0.1 keeps 10 % of the KV cache")
        ratios.append(value)
    if not ratios:
        raise ChunkKVError("--ratios: give at least one fraction, e.g. 0.1")
    return list(dict.fromkeys(ratios))


def parse_lengths(text: str) -> list[int]:
    from chunkkv_cli.memory import parse_size

    lengths = [parse_size(p, "--lengths") for p in text.split(",") if p.strip()]
    if not lengths:
        raise ChunkKVError("--lengths: give at least one length, e.g. 1k,2k,4k")
    return sorted(set(lengths))


def needle_triple(needle: str | None, question: str | None, answer: str | None) -> tuple[str, str, str]:
    from chunkkv_cli.eval import data

    given = [v is not None for v in (needle, question, answer)]
    if any(given) and not all(given):
        raise ChunkKVError("--needle, --needle-question and --needle-answer go together: give all three")
    if needle is not None and answer.strip().lower() not in needle.lower():
        raise ChunkKVError(f"--needle-answer {answer!r} does not appear in --needle, so no answer could find it")
    if needle is None:
        return data.DEFAULT_NEEDLE, data.DEFAULT_NEEDLE_QUESTION, data.DEFAULT_NEEDLE_ANSWER
    return needle, question, answer


def _or_default(max_new_tokens: int | None, task: str) -> int:
    return DEFAULT_MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens


def _at_least(value: int, low: int, flag: str) -> int:
    if value < low:
        raise ChunkKVError(f"{flag} must be at least {low}, got {value}")
    return value


def depth_list(depths: int) -> list[float]:
    from chunkkv_cli.eval.data import depth_fractions

    return depth_fractions(depths)


def _load(model: str, device: str):
    from chunkkv_cli.model import load_model

    loaded = load_model(model, device)
    if loaded.tokenizer is None:
        raise ChunkKVError(f"{model} has no weights or tokenizer to evaluate; use a model with weights")
    return loaded


@dataclass
class TaskData:
    """What a task's prompts are made of, read (and checked) before the model loads."""

    task: str
    lengths: list[int]
    depths: list[float] = field(default_factory=list)
    needle: tuple[str, str, str] | None = None
    haystack: str | None = None
    items: list = field(default_factory=list)  # QA items (longqa, similarity)
    questions: list = field(default_factory=list)  # manyshot problems to ask
    pool: list = field(default_factory=list)  # manyshot worked examples
    limit: int | None = None
    seed: int = 0


def read_task_data(task, data, haystack, needle, limit, seed, lengths, depths) -> tuple[TaskData, dict]:
    """The task's raw data and a description of where it came from (part of the resume identity)."""
    raw = TaskData(task, lengths, depths, limit=limit, seed=seed)
    if task == "needle" or (task == "similarity" and data is None and not _bundled_available()):
        raw.task, raw.needle = "needle", needle
        raw.haystack = _read_text(haystack) if haystack is not None else None
        where = {"haystack": file_source(haystack)} if haystack else {"haystack": f"generated (seed {seed})"}
        return raw, {**where, "needle": list(needle)}
    if task in ("longqa", "similarity"):
        items, source = _qa_items(task, data)
        raw.items = items[:limit]
        return raw, source
    raw.questions, raw.pool, source = _problems(data, limit or 10, max(lengths), seed)
    return raw, source


def make_samples(raw: TaskData, tokenizer, max_prompt: int) -> list:
    """Tokenised prompts for the task (a similarity run without --data may use needle prompts)."""
    from chunkkv_cli.eval import data as ev

    if raw.task == "needle":
        samples = ev.needle_samples(tokenizer, raw.lengths, raw.depths, raw.needle, raw.haystack, raw.seed, max_prompt)
        return samples[: raw.limit]
    if raw.items:
        return ev.longqa_samples(tokenizer, raw.items, max_prompt)
    return ev.manyshot_samples(tokenizer, raw.questions, raw.pool, raw.lengths, raw.seed)


def _bundled_available() -> bool:
    return (BUNDLED_SAMPLES / "lighthouse.md").is_file() and (BUNDLED_SAMPLES / "questions.jsonl").is_file()


def _read_text(path: Path) -> str:
    from chunkkv_cli.documents import read_document

    return read_document(str(path))


def _qa_items(task: str, data: Path | None):
    """Without --data, longqa and similarity use the bundled lighthouse document and its questions."""
    from chunkkv_cli.eval import data as ev

    if data is None:
        document = _read_text(BUNDLED_SAMPLES / "lighthouse.md")
        questions = [r for _, r in ev.read_jsonl(BUNDLED_SAMPLES / "questions.jsonl")]
        items = [ev.QA(f"lighthouse-{i}", document, r["question"], r["answers"]) for i, r in enumerate(questions, 1)]
        return items, {"data": "samples/lighthouse.md + samples/questions.jsonl"}
    if data.suffix == ".jsonl":
        return ev.read_longqa(data), file_source(data)
    text = _read_text(data)
    return [ev.QA(data.stem, text, "What is this document about?", [""])], file_source(data)


def _problems(data: Path | None, n_questions: int, max_length: int, seed: int):
    """Test questions and a pool of worked examples: the first N problems of --data and the rest, or generated."""
    from chunkkv_cli.eval import data as ev

    if data is None:
        pool_size = max_length // 40 + 20
        source = {"data": f"generated arithmetic (seed {seed})"}
        return ev.arithmetic_problems(n_questions, seed), ev.arithmetic_problems(pool_size, seed + 1), source
    problems = ev.read_gsm8k(data)
    if len(problems) < 2:
        raise ChunkKVError(f"{data} needs at least two problems: one to ask, others as examples")
    n_questions = min(n_questions, len(problems) - 1)
    return problems[:n_questions], problems[n_questions:], file_source(data)


def _run(loaded, samples, settings, out: Path, err: Console) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from chunkkv_cli.eval.runner import run_grid, summarize, write_results

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
                        disable=not err.is_terminal)  # fmt: skip
    with progress:
        bar = progress.add_task(f"{settings.task}", total=len(samples))

        def on_sample(index, sample, seconds) -> None:
            progress.update(bar, advance=1, description=f"{settings.task} {sample.id}")
            if not err.is_terminal:
                status = "already done" if seconds is None else f"{seconds:.1f} s"
                err.print(f"[{index + 1}/{len(samples)}] {settings.task} {sample.id}: {status}", highlight=False)

        store = run_grid(loaded.model, loaded.tokenizer, samples, settings, out, on_sample)
    results = summarize(store, samples, settings)
    results["model"] = loaded.profile.name
    results["plots"] = [str(p) for p in _plots(results, out, err)]
    write_results(out, results)
    return results


def _plots(results: dict, out: Path, err: Console) -> list:
    from chunkkv_cli.eval.plots import have_matplotlib, plot_results

    if not have_matplotlib():
        err.print("[yellow]matplotlib is not installed: skipping plots (pip install 'chunkkv[plot]')[/]")
        return []
    return plot_results(results, out)


def _report(results: dict, err: Console, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(results, indent=2))
        return
    console = Console()
    console.print(results_table(results))
    if results["task"] in PAPER_NOTES:
        console.print(f"[dim]{PAPER_NOTES[results['task']]}[/]", highlight=False)
    for ratio, order in results["ordering"].items():
        console.print(f"[dim]measured at ratio {ratio}: {order}[/]", highlight=False)
    written = ", ".join(results["plots"]) or "no plots"
    console.print(f"[dim]results.json and {written}[/]", highlight=False)


def results_table(results: dict) -> Table:
    """Methods x ratios, the task's headline score (%) with the number of samples behind each cell."""
    ratios = [f"{r:g}" for r in results["settings"]["ratios"]]
    table = Table(title=f"{results['task']}: {results['metric']} · {results['model']} · {_plural(results['samples'], 'sample')}")
    table.add_column("method")
    for ratio in ratios:
        table.add_column(f"ratio {ratio}", justify="right")
    n_by_cell = {(c["method"], c["ratio"]): c["n"] for c in results["cells"]}
    total = results["samples"]
    for method, row in results["table"].items():
        if method == REFERENCE:
            table.add_row(method, *[f"[dim]{_cell(row.get('1'), n_by_cell.get((method, '1')), total)}[/]"] * len(ratios))
            continue
        table.add_row(method, *[_cell(row.get(r), n_by_cell.get((method, r)), total) for r in ratios])
    return table


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _cell(value, n, total) -> str:
    """The score, with its sample count when some samples are missing from the cell."""
    if value is None:
        return "–"
    return f"{value:.1f}" + (f" [dim](n={n})[/]" if n != total else "")
