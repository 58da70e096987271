"""`chunkkv batch`: answer a JSONL file of (document, question) jobs; resumable; data-parallel under torchrun."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from chunkkv_cli.commands.options import (
    DEFAULT_MODEL,
    BudgetOpt,
    ChunkSizeOpt,
    DecoderOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxNewTokensOpt,
    method_name,
    MethodOpt,
    ModelOpt,
    RatioOpt,
    ReuseOpt,
    TemperatureOpt,
    TopPOpt,
    TruncateOpt,
    TrustRemoteCodeOpt,
    WindowOpt,
    require_reusable,
)
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.options import Compression, Generation, ModelSpec

RayOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="Run on Ray Data (the ray extra: pip install 'chunkkv\\[ray]'): alone, a Ray instance on this machine; "
        "with ADDRESS (HOST:PORT from `ray start --head`, ray://HOST:PORT or auto), that cluster. One actor and "
        "model per GPU (CPU actors without GPUs); documents must be readable at the same path on every node.",
        show_default=False,
    ),
]

EXAMPLES = """[b]Examples[/b]

  chunkkv batch jobs.jsonl -o answers.jsonl --ratio 0.2

  chunkkv batch jobs.jsonl -o answers.jsonl --question-aware --json

  torchrun --nproc-per-node 8 --no-python chunkkv batch jobs.jsonl -o answers.jsonl

  chunkkv batch jobs.jsonl -o answers.jsonl --ray                  # Ray Data on this machine

  chunkkv batch jobs.jsonl -o answers.jsonl --ray 10.0.0.1:6379    # a cluster started with `ray start --head`

[b]Jobs file[/b]: JSONL, one job per line, e.g.

  {"id": "q1", "document": "docs/a.md", "question": "Who signed it?"}

  {"document": "docs/a.md", "question": "When?", "budget": 512, "meta": {"gold": "1911"}}

document and question are required; a relative document path is read from the jobs file's folder. id (optional, unique) keys resume; it defaults to a hash of document, question, method, ratio and budget. method, ratio or budget (optional) replace the options for that job; meta (optional) is copied to its record. Any other key is an error.

[b]Output[/b]: one JSON record per job, in input order: id, line, document, question, status (ok or error), answer, error, token counts, seconds, rank, settings and meta. Records are appended to ANSWERS.parts/ as jobs finish and merged into ANSWERS at the end. A rerun skips the jobs already answered and tries failed ones again. Exit code 1 when a job failed.

Without --question-aware each document is compressed once without its questions (as `ask --questions`), which costs quality: see the README.
"""


def batch(
    jobs: Annotated[Path, typer.Argument(help="JSONL file, one job per line: {\"document\": PATH, \"question\": TEXT} (see below).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Answers file: JSONL, one record per job, in input order.")],
    model: ModelOpt = DEFAULT_MODEL,
    method: MethodOpt = None,
    ratio: RatioOpt = None,
    budget: BudgetOpt = None,
    chunk_size: ChunkSizeOpt = None,
    window: WindowOpt = 32,
    reuse_layers: ReuseOpt = 1,
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    truncate: TruncateOpt = False,
    question_aware: Annotated[
        bool,
        typer.Option(
            help="Prefill each job's whole prompt, so its question scores the document (as `ask DOC QUESTION`): "
            "one prefill per job instead of one per document.",
        ),
    ] = False,
    decoder: DecoderOpt = "auto",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    ray: RayOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Answer a JSONL file of (document, question) jobs: each document compressed once, resumable, data-parallel."""
    from chunkkv_cli.batch import Rank, Settings

    spec = ModelSpec(model, device, dtype, trust_remote_code)
    compression = Compression(method_name(method, question_aware), ratio, budget, window, chunk_size, reuse_layers)
    settings = Settings.of(spec, compression, Generation(max_new_tokens, temperature, top_p, decoder), truncate,
                           question_aware)  # fmt: skip
    require_reusable(compression.compressor(), "batch")
    rank = Rank.from_env()
    summary = run(jobs, output, spec, settings, rank) if ray is None else run_on_ray(jobs, output, spec, settings, ray, rank)
    if summary is None:
        return  # ranks other than 0: rank 0 merges and reports
    typer.echo(json.dumps(summary, indent=2) if json_out else summary_line(summary))
    if summary["failed"]:
        raise typer.Exit(1)


def run(jobs: Path, output: Path, spec: ModelSpec, settings, rank) -> dict | None:
    """Check the files, then answer this rank's share of the jobs (the model loads at the first job)."""
    from chunkkv_cli.batch import rank_device, run_batch
    from chunkkv_cli.batch_runner import ModelRunner
    from chunkkv_cli.jobs import read_jobs
    from chunkkv_cli.profiles import load_profile

    load_profile(spec.model)  # an unknown model fails now, not at the first job
    check_output(jobs, output)
    job_list = read_jobs(jobs)
    runner = ModelRunner(lambda: spec.load(rank_device(spec.device, rank)), job_list, settings)
    with _progress(Console(stderr=True), rank.rank != 0) as progress:
        reporter = Reporter(progress, rank.rank if rank.world > 1 else None)
        return run_batch(job_list, output, runner, settings, rank, reporter.start, reporter.done)


def run_on_ray(jobs: Path, output: Path, spec: ModelSpec, settings, address: str, rank) -> dict:
    """The same jobs, records and resume on a Ray cluster: one actor (and model) per GPU, documents spread over them."""
    from chunkkv_cli.jobs import read_jobs
    from chunkkv_cli.profiles import load_profile
    from chunkkv_cli.ray_batch import ModelRunners, require_ray, run_ray_batch

    if rank.world > 1:
        raise ChunkKVError("--ray spreads the jobs over a Ray cluster itself: run it once, not under torchrun")
    require_ray()
    load_profile(spec.model)
    check_output(jobs, output)
    if Path(address).is_file():
        raise ChunkKVError(f"--ray takes a cluster address, not the file {address}: put --ray after the jobs file")
    job_list = read_jobs(jobs)
    with _progress(Console(stderr=True), False) as progress:
        reporter = Reporter(progress, None)
        return run_ray_batch(job_list, output, ModelRunners(spec, settings), settings, address, reporter.start,
                             reporter.done)  # fmt: skip


def check_output(jobs: Path, output: Path) -> None:
    """A writable --output that is not the jobs file and, when it exists, holds batch records (read here, so
    someone else's file is refused before any model work, never rewritten)."""
    from chunkkv_cli.answers import existing_records
    from chunkkv_cli.outputs import check_output_file

    check_output_file(output, "--output")
    if output.exists() and jobs.exists() and output.resolve() == jobs.resolve():
        raise ChunkKVError("--output is the jobs file itself; give another path")
    existing_records(output)


class Reporter:
    """Progress of this rank's jobs, and a warning line per failed job."""

    def __init__(self, progress: Progress, rank: int | None):
        self.progress, self.rank, self.task = progress, rank, None

    def start(self, n_jobs: int) -> None:
        self.task = self.progress.add_task("answering", total=n_jobs)

    def done(self, record: dict) -> None:
        self.progress.advance(self.task)
        if record["status"] != "ok":
            where = f"rank {self.rank}: " if self.rank is not None else ""
            self.progress.console.print(
                f"[yellow]warning:[/] {where}job {record['id']} (line {record['line']}) failed: {record['error']}",
                highlight=False,
                soft_wrap=True,
            )


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )


def summary_line(s: dict) -> str:
    ranks = f" over {s['ranks']} ranks" if s["ranks"] > 1 else ""
    if s.get("ray_actors"):
        ranks = f" on {s['ray_actors']} Ray actor{'s' if s['ray_actors'] > 1 else ''}"
    missing = f", {s['missing']} without a record" if s["missing"] else ""
    return (
        f"{s['output']}: {s['jobs']} jobs · {s['answered']} answered, {s['failed']} failed, {s['skipped']} skipped "
        f"(answered before){missing} · {s['new_tokens']:,} new tokens in {s['seconds']:.1f} s "
        f"({s['tokens_per_second']:.1f} tokens/s){ranks}"
    )
