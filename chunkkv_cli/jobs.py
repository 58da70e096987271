"""Batch jobs: a JSONL file of (document, question) pairs, their ids, their order, and their split over ranks.

One job per non-blank line, a JSON object (the schema `chunkkv batch --help` shows):

    {"id": "q3-1", "document": "reports/q3.md", "question": "What changed in Q3?", "method": "snapkv", "ratio": 0.2}

- `document` (required): a text file; a relative path is read from the jobs file's folder, wherever the
  command runs.
- `question` (required): a non-empty string.
- `id` (optional): a string or an integer, unique in the file. The default is a hash of the job's document
  (as written), question, method, ratio and budget, so it survives lines being added or moved; resume keys
  on it.
- `method`, `ratio`, `budget` (optional): this job's compression instead of --method, --ratio, --budget;
  `ratio` and `budget` exclude each other.
- `meta` (optional): anything, copied to the job's output record untouched (gold answers, tags).

Any other key is refused, so a misspelt optional key fails instead of being ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chunkkv_cli.documents import json_line
from chunkkv_cli.errors import ChunkKVError

def batch_methods() -> list[str]:
    """Methods whose document, compressed once, serves all its questions."""
    from chunkkv_cli.compress import methods_where

    return methods_where(reusable=True)


KEYS = ("id", "document", "question", "method", "ratio", "budget", "meta")


@dataclass(frozen=True)
class Job:
    """One (document, question) pair; `path` is `document` resolved against the jobs file's folder."""

    id: str
    line: int
    document: str
    path: Path
    question: str
    method: str | None = None
    ratio: float | None = None
    budget: int | None = None
    meta: Any = None

    def compression(self) -> tuple:
        """This job's own compression overrides: jobs of one document with equal overrides share a prefix."""
        return (self.method, self.ratio, self.budget)


def read_jobs(path: str | Path) -> list[Job]:
    """Jobs from a JSONL file, in file order; any bad line is a one-line error naming file and line."""
    from chunkkv_cli.documents import read_document

    source = Path(path)
    if not source.is_file():
        raise ChunkKVError(f"jobs file not found: {source}")
    text = read_document(str(source))
    jobs, seen = [], {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        job = parse_job(line, line_no, source)
        if job.id in seen:
            raise ChunkKVError(
                f"{source}:{line_no}: job id {job.id!r} repeats line {seen[job.id]}: give each job its own 'id'"
            )
        seen[job.id] = line_no
        jobs.append(job)
    return jobs


def parse_job(line: str, line_no: int, source: Path) -> Job:
    """One line of a jobs file as a Job (see the module docstring for the schema)."""
    where = f"{source}:{line_no}"
    record = json_line(line, where)
    if not isinstance(record, dict):
        raise ChunkKVError(f"{where}: expected a JSON object with 'document' and 'question'")
    unknown = sorted(set(record) - set(KEYS))
    if unknown:
        raise ChunkKVError(f"{where}: unknown key {unknown[0]!r}; a job has {', '.join(KEYS)}")
    document = _text(record, "document", where)
    question = _text(record, "question", where)
    method, ratio, budget = _compression(record, where)
    job_id = _job_id(record, where) or default_id(document, question, method, ratio, budget)
    path = Path(document).expanduser()
    path = path if path.is_absolute() else source.parent / path
    return Job(job_id, line_no, document, path, question, method, ratio, budget, record.get("meta"))


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ChunkKVError(f"{where}: '{key}' must be a non-empty string")
    return value


def _job_id(record: dict, where: str) -> str | None:
    if "id" not in record:
        return None
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise ChunkKVError(f"{where}: 'id' must be a non-empty string or an integer")
    return str(value)


def _compression(record: dict, where: str) -> tuple[str | None, float | None, int | None]:
    method, ratio, budget = record.get("method"), record.get("ratio"), record.get("budget")
    if method is not None and method not in batch_methods():
        raise ChunkKVError(f"{where}: 'method' must be one of {', '.join(batch_methods())}, got {method!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        raise ChunkKVError(f"{where}: 'ratio' must be a number in (0, 1], got {ratio!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ChunkKVError(f"{where}: 'budget' must be a positive integer number of tokens, got {budget!r}")
    if ratio is not None and budget is not None:
        raise ChunkKVError(f"{where}: give 'ratio' or 'budget', not both")
    return method, None if ratio is None else float(ratio), budget


def default_id(document: str, question: str, method=None, ratio=None, budget=None) -> str:
    """12 hex digits of sha256 over what the job asks: stable when lines move, new when the job changes."""
    payload = json.dumps([document, question, method, ratio, budget], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def document_key(job: Job) -> str:
    """Jobs naming one file in different ways ('a.md', './a.md') share it."""
    return str(job.path.resolve())


def run_order(jobs: list[Job]) -> list[Job]:
    """Jobs grouped by document (first appearance first), then by compression, then by line.

    Consecutive jobs of one document with the same compression reuse one compressed prefix.
    """
    first_doc: dict[str, int] = {}
    first_compression: dict[tuple, int] = {}
    for job in jobs:
        first_doc.setdefault(document_key(job), job.line)
        first_compression.setdefault((document_key(job), job.compression()), job.line)
    return sorted(
        jobs,
        key=lambda j: (first_doc[document_key(j)], first_compression[(document_key(j), j.compression())], j.line),
    )


def shard(jobs: list[Job], world: int) -> list[list[Job]]:
    """Jobs per rank, in run order: each document's jobs all on one rank, whole documents dealt largest
    first (most jobs; ties by first line) to the rank with the fewest jobs so far (ties: the lowest rank).

    Depends only on `jobs` and `world`, so every rank computes the same split without talking to the others.
    """
    loads, shards = [0] * world, [[] for _ in range(world)]
    for group in document_groups(jobs):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shards[rank].extend(group)
        loads[rank] += len(group)
    return [run_order(jobs_of_rank) for jobs_of_rank in shards]


def document_groups(jobs: list[Job]) -> list[list[Job]]:
    """Each document's jobs (in run order), largest group first (most jobs; ties by first line)."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(document_key(job), []).append(job)
    return [run_order(group) for group in sorted(groups.values(), key=lambda g: (-len(g), g[0].line))]
