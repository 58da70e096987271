"""Batch output: one JSON record per job, appended to a part file per rank as jobs finish, merged in input order.

While a batch runs, rank r of w appends to `ANSWERS.parts/rank-r-of-w.jsonl`: one `write` of one whole line,
flushed and fsynced, so an interrupted run loses at most the job in progress; a torn last line is ignored on
reading and cut off before the next append. The merge writes every job's latest record (an answer beats an
error) to a temporary file beside ANSWERS, fsyncs it, renames it into place and only then deletes the parts:
at every moment each finished job is in ANSWERS or in a part, so a rerun finds it and skips it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.outputs import TEMP_SUFFIX, temp_prefix


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def part_path(output: Path, rank: int, world: int) -> Path:
    return parts_dir(output) / f"rank-{rank}-of-{world}.jsonl"


def read_records(path: Path, torn_ok: bool = True) -> list[dict]:
    """The records of one JSONL file; a last line without its newline (a torn write) is ignored when `torn_ok`.

    ANSWERS itself is only ever written whole, so there such a line means the file is someone else's.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChunkKVError(f"{path} is not UTF-8, so not batch output; use another --output") from None
    except OSError as err:
        raise ChunkKVError(f"cannot read {path}: {err.strerror}") from err
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]
    if torn.strip() and not torn_ok:
        raise ChunkKVError(f"{path} does not end like batch output (its last line has no newline); use another --output")
    records = []
    for line_no, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "id" not in record or "status" not in record:
            raise ChunkKVError(f"{path}:{line_no}: not a batch answer record; use another --output or remove the file")
        records.append(record)
    return records


def existing_records(output: Path) -> list[dict]:
    """Records of earlier runs: ANSWERS first, then every part file (any rank count), oldest first."""
    if output.is_dir():
        raise ChunkKVError(f"--output is a directory: {output}")
    records = read_records(output, torn_ok=False) if output.exists() else []
    folder = parts_dir(output)
    parts = sorted(folder.glob("rank-*-of-*.jsonl")) if folder.is_dir() else []
    return records + [record for path in parts for record in read_records(path)]


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


class PartWriter:
    """Appends records to one rank's part file, each a single fsynced line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(path)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cut_torn_tail(path: Path) -> None:
    """Drop a last line left without its newline by an interrupted write, so the next append starts clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


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


def write_atomically(path: Path, text: str) -> None:
    """A temporary file in the target folder, fsynced, renamed into place: never a partial file under `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
