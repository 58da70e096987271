"""Many (document, question) jobs: on one process, or data-parallel over the ranks of torchrun / accelerate launch.

Every rank reads the jobs file and the records of earlier runs, waits for the others (nothing is written
before everyone has read), takes its share of the unfinished jobs (`jobs.shard`: each document on one rank)
and answers them in run order, appending a record per job to its part file (`answers`). A job that fails
is recorded with its error and the rest go on. When all ranks are done, rank 0 merges the records into the
output in input order. The model is loaded on a rank's first job, so a rerun with nothing left to do only
merges.

The runner answers one job: `runner(job, settings) -> dict` with at least `answer`. Tests pass a plain
function; `ModelRunner` compresses each document once and answers all its questions from copies of that cache.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

from chunkkv_cli.answers import PartWriter, existing_records, finished, merge, part_path
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.jobs import Job, run_order, shard
from chunkkv_cli.memory import DEFAULT_RATIO
from chunkkv_cli.options import Compression, Generation, ModelSpec

Runner = Callable[[Job, "Settings"], dict]
# How long a rank that has finished its share waits for the slowest one.
RANK_WAIT = timedelta(days=7)


@dataclass(frozen=True)
class Settings:
    """What decides an answer; recorded with every answer, and compared on resume."""

    model: str
    method: str = "chunkkv"
    ratio: float | None = None
    budget: int | None = None
    chunk_size: int | None = None
    window: int = 32
    reuse_layers: int = 1
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    truncate: bool = False
    question_aware: bool = False
    decoder: str = "auto"

    def for_job(self, job: Job) -> Settings:
        """These settings with the job's own method, ratio or budget; ratio 0.1 when neither is set."""
        settings = replace(self, method=job.method or self.method)
        if job.ratio is not None or job.budget is not None:
            settings = replace(settings, ratio=job.ratio, budget=job.budget)
        if settings.budget is not None:
            return replace(settings, ratio=None)
        return replace(settings, ratio=DEFAULT_RATIO if settings.ratio is None else settings.ratio)

    @classmethod
    def of(cls, spec: ModelSpec, compression: Compression, generation: Generation, truncate: bool = False,
           question_aware: bool = False) -> Settings:  # fmt: skip
        """The record of a run's options (flat, as written beside every answer)."""
        c, g = compression, generation
        return cls(spec.model, c.method, c.ratio, c.budget, c.chunk_size, c.window, c.reuse_layers, g.max_new_tokens,
                   g.temperature, g.top_p, truncate, question_aware, g.decoder)  # fmt: skip

    def compression(self) -> Compression:
        return Compression(self.method, self.ratio, self.budget, self.window, self.chunk_size, self.reuse_layers)

    def generation(self) -> Generation:
        return Generation(self.max_new_tokens, self.temperature, self.top_p, self.decoder)

    def prefix_key(self) -> tuple:
        """What decides a compressed prefix: jobs with the same document and key share one."""
        return (self.compression(), self.truncate)


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun / accelerate launch (RANK, WORLD_SIZE, LOCAL_RANK); 0 of 1 alone."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @classmethod
    def from_env(cls, env=None) -> Rank:
        env = os.environ if env is None else env
        rank = _env_int(env, "RANK", 0)
        world = _env_int(env, "WORLD_SIZE", 1)
        local = _env_int(env, "LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ChunkKVError(f"RANK={rank} and WORLD_SIZE={world} do not describe a rank: need 0 <= RANK < WORLD_SIZE")
        return cls(rank, world, local)


def _env_int(env, name: str, default: int) -> int:
    text = env.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise ChunkKVError(f"environment variable {name}={text!r} is not an integer") from None


class RunnerError(ChunkKVError):
    """A failure of the runner itself, not of one job (the model does not load): it stops the batch."""


class Collective:
    """Barriers and gathers between ranks: torch.distributed over gloo (CPU), nothing at all for one rank."""

    def __init__(self, rank: Rank):
        self.world, self._owned = rank.world, False
        if self.world == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            try:
                dist.init_process_group("gloo", rank=rank.rank, world_size=rank.world, timeout=RANK_WAIT)
            except (RuntimeError, ValueError) as err:
                raise ChunkKVError(
                    f"rank {rank.rank} of {rank.world} cannot reach the other ranks ({str(err).splitlines()[0]}); "
                    "start ranks with torchrun or accelerate launch, which set MASTER_ADDR and MASTER_PORT"
                ) from err
            self._owned = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value) -> list:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()


@dataclass
class Tally:
    """One rank's counts for the summary."""

    answered: int = 0
    failed: int = 0
    new_tokens: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add(self, record: dict) -> None:
        if record["status"] == "ok":
            self.answered += 1
            self.new_tokens += record.get("new_tokens") or 0
            self.prefill_tokens += record.get("prefill_tokens") or 0
        else:
            self.failed += 1


def check_resume(records: list[dict], jobs: list[Job], settings: Settings, output: Path) -> None:
    """Refuse an output that holds other jobs, or answers made with other settings (mixing them would mislead)."""
    by_id = {job.id: job for job in jobs}
    strangers = [r["id"] for r in records if r["id"] not in by_id]
    if strangers:
        raise ChunkKVError(
            f"{output} holds records of {len(set(strangers))} jobs not in the jobs file (first: id {strangers[0]!r}); "
            "use another --output, or delete it to start over"
        )
    for job_id, record in finished(records).items():
        wanted = asdict(settings.for_job(by_id[job_id]))
        had = record.get("settings") or {}
        for key, value in wanted.items():
            if had.get(key) != value:
                raise ChunkKVError(
                    f"{output}: job {job_id!r} was answered with {key} = {had.get(key)!r}, this run asks for "
                    f"{value!r}; use another --output, or delete it to start over"
                )


def run_batch(
    jobs: list[Job],
    output: Path,
    runner: Runner,
    settings: Settings,
    rank: Rank = Rank(),
    on_start: Callable[[int], None] | None = None,
    on_done: Callable[[dict], None] | None = None,
    collective: Collective | None = None,
) -> dict | None:
    """Answer this rank's share of the unfinished jobs; rank 0 merges and returns the summary (others: None)."""
    group = collective or Collective(rank)
    try:
        start = time.perf_counter()
        records = existing_records(output)
        check_resume(records, jobs, settings, output)
        done = finished(records)
        group.barrier()  # every rank has read the same records before anyone appends
        mine = shard([job for job in jobs if job.id not in done], rank.world)[rank.rank]
        if on_start is not None:
            on_start(len(mine))
        tally = run_jobs(mine, runner, settings, part_path(output, rank.rank, rank.world), rank.rank, on_done)
        tally.seconds = time.perf_counter() - start
        tallies = group.gather(tally)
        counts = merge(output, [job.id for job in jobs]) if rank.rank == 0 else None
        group.barrier()  # nobody exits (which torchrun may take for a failure) before the merge is written
    finally:
        if collective is None:
            group.close()
    return summarize(tallies, counts, len(jobs), len(done), output) if counts is not None else None


def run_jobs(
    jobs: list[Job], runner: Runner, settings: Settings, part: Path, rank: int = 0,
    on_done: Callable[[dict], None] | None = None,
) -> Tally:  # fmt: skip
    """Answer `jobs` in run order, appending one record each to `part`; a failure is recorded, not raised."""
    tally = Tally()
    if not jobs:
        return tally
    with PartWriter(part) as writer:
        for job in run_order(jobs):
            record = run_job(job, runner, settings.for_job(job), rank)
            writer.write(record)
            tally.add(record)
            if on_done is not None:
                on_done(record)
    return tally


def run_job(job: Job, runner: Runner, settings: Settings, rank: int) -> dict:
    """The job's output record: its answer and numbers, or its error (CHUNKKV_DEBUG=1 raises instead)."""
    start = time.perf_counter()
    try:
        result, error = runner(job, settings), None
    except RunnerError:
        raise
    except Exception as err:  # one job's failure must not stop the others
        if os.environ.get("CHUNKKV_DEBUG"):
            raise
        result, error = {}, describe(err)
    record = {"id": job.id, "line": job.line, "document": job.document, "question": job.question}
    record.update(status="error" if error else "ok", answer=result.pop("answer", None), error=error)
    record.update(result)
    record.update(seconds=round(time.perf_counter() - start, 3), rank=rank, settings=asdict(settings))
    if job.meta is not None:
        record["meta"] = job.meta
    return record


def describe(err: Exception) -> str:
    """One line for a job's error: the message of a known error, else the exception's type and message."""
    if isinstance(err, ChunkKVError):
        return str(err)
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, MemoryError) or "out of memory" in message.lower():
        return f"out of memory: {message or type(err).__name__}; try a lower --ratio/--budget or a shorter document"
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def summarize(tallies: list[Tally], counts: dict, n_jobs: int, n_skipped: int, output: Path) -> dict:
    """The run's summary: this run's answers and failures over all ranks, jobs skipped as already answered."""
    seconds = max(t.seconds for t in tallies)
    new_tokens = sum(t.new_tokens for t in tallies)
    return {
        "output": str(output),
        "jobs": n_jobs,
        "answered": sum(t.answered for t in tallies),
        "failed": sum(t.failed for t in tallies),
        "skipped": n_skipped,
        "missing": counts["missing"],
        "ranks": len(tallies),
        "new_tokens": new_tokens,
        "prefill_tokens": sum(t.prefill_tokens for t in tallies),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(new_tokens / seconds, 2) if seconds > 0 else 0.0,
    }


def rank_device(device: str, rank: Rank) -> str:
    """Each rank of a data-parallel run takes GPU LOCAL_RANK; alone, --device as given."""
    if rank.world == 1 or device == "cpu":
        return device
    import torch

    if not torch.cuda.is_available():
        if device == "auto":
            return "cpu"
        raise ChunkKVError(f"--device {device} was asked for but no CUDA GPU is visible")
    if device not in ("auto", "cuda"):
        raise ChunkKVError(f"with {rank.world} ranks each rank takes GPU LOCAL_RANK: use --device auto or cuda, not {device}")
    if rank.local >= torch.cuda.device_count():
        raise ChunkKVError(f"LOCAL_RANK={rank.local} but only {torch.cuda.device_count()} GPUs are visible")
    torch.cuda.set_device(rank.local)
    return f"cuda:{rank.local}"
