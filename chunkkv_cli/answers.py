"""Batch output: one JSON record per job, appended to a part file per rank as jobs finish, merged in input order.

While a batch runs, rank r of w appends to `ANSWERS.parts/rank-r-of-w.jsonl`: one `write` of one whole line,
flushed and fsynced, so an interrupted run loses at most the job in progress; a torn last line is ignored on
reading and cut off before the next append. The merge writes every job's latest record (an answer beats an
error) to a temporary file beside ANSWERS, fsyncs it, renames it into place and only then deletes the parts:
at every moment each finished job is in ANSWERS or in a part, so a rerun finds it and skips it.
"""

from __future__ import annotations

import json
from pathlib import Path

from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.records import RecordFile, RecordFormat, read_records, write_atomically

PartWriter = RecordFile  # a rank's part file


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def part_path(output: Path, rank: int, world: int) -> Path:
    return parts_dir(output) / f"rank-{rank}-of-{world}.jsonl"


ANSWERS = RecordFormat(
    what="batch output",
    is_record=lambda record: "id" in record and "status" in record,
    bad_line="not a batch answer record; use another --output or remove the file",
    other_file="use another --output",
)


def existing_records(output: Path) -> list[dict]:
    """Records of earlier runs: ANSWERS first, then every part file (any rank count), oldest first."""
    if output.is_dir():
        raise ChunkKVError(f"--output is a directory: {output}")
    records = read_records(output, ANSWERS, torn_ok=False) if output.exists() else []  # written whole, never torn
    folder = parts_dir(output)
    parts = sorted(folder.glob("rank-*-of-*.jsonl")) if folder.is_dir() else []
    return records + [record for path in parts for record in read_records(path, ANSWERS)]


def latest(records: list[dict]) -> dict[str, dict]:
    """Each job id's record to keep: a later answer replaces an earlier one or an error; an error replaces only an error."""
    kept: dict[str, dict] = {}
    for record in records:
        old = kept.get(record["id"])
        if old is None or record["status"] == "ok" or old["status"] != "ok":
            kept[record["id"]] = record
    return kept


def finished(records: list[dict]) -> dict[str, dict]:
    """Jobs already answered (failed ones are tried again), by id."""
    return {job_id: r for job_id, r in latest(records).items() if r["status"] == "ok"}


def merge(output: Path, job_ids: list[str]) -> dict[str, int]:
    """Write every job's latest record to `output` in `job_ids` order, atomically; then delete the part files.

    Returns counts: answered, failed, missing (jobs with no record yet).
    """
    parts = sorted(parts_dir(output).glob("rank-*-of-*.jsonl")) if parts_dir(output).is_dir() else []
    kept = latest(existing_records(output))
    rows = [kept[job_id] for job_id in job_ids if job_id in kept]
    write_atomically(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for part in parts:
        part.unlink()
    if parts and not any(parts_dir(output).iterdir()):
        parts_dir(output).rmdir()
    answered = sum(r["status"] == "ok" for r in rows)
    return {"answered": answered, "failed": len(rows) - answered, "missing": len(job_ids) - len(rows)}
