"""JSONL record files behind every resume: batch answers (`answers.py`) and eval grid points (`eval/runner.py`).

A record is one line, written whole, flushed and fsynced, so an interrupted run loses at most the record
being written. Reading takes complete lines only: a last line without its newline is a torn write, ignored,
and cut off before the next append. Any other line that is not a record is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.outputs import TEMP_SUFFIX, temp_prefix


@dataclass(frozen=True)
class RecordFormat:
    """What a record file holds: how to tell a record, and the words its errors use."""

    what: str  # "batch output": a file that is not one is "not UTF-8, so not batch output"
    is_record: Callable[[dict], bool]
    bad_line: str  # ends the error for a line that is not a record
    other_file: str  # the fix when the file is someone else's: "use another --output"


def read_records(path: Path, form: RecordFormat, torn_ok: bool = True) -> list[dict]:
    """The records of one JSONL file, in order. A last line without its newline is a torn write, ignored when
    `torn_ok`; a file only ever written whole (a merged output) cannot have one, so there it is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChunkKVError(f"{path} is not UTF-8, so not {form.what}; {form.other_file}") from None
    except OSError as err:
        raise ChunkKVError(f"cannot read {path}: {err.strerror}") from err
    *complete, torn = text.split("\n")
    if torn.strip() and not torn_ok:
        raise ChunkKVError(f"{path} does not end like {form.what} (its last line has no newline); {form.other_file}")
    records = []
    for line_no, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not form.is_record(record):
            raise ChunkKVError(f"{path}:{line_no}: {form.bad_line}")
        records.append(record)
    return records


class RecordFile:
    """Appends records to one JSONL file, each a single fsynced line (a torn tail is cut off first)."""

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

    def __enter__(self) -> RecordFile:
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
