"""Checks on the files a command will write, made before any model work, and temporary-file hygiene.

Every atomic write goes through a temporary file named `.NAME.PID.XXXX.tmp` beside its target; a run
killed before the rename leaves one behind, and the next run for the same target removes those whose
process is gone (never those of a run still going).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from chunkkv_cli.errors import ChunkKVError

TEMP_SUFFIX = ".tmp"


def check_output_file(path: Path, flag: str, create_folder: bool = False) -> None:
    """`path` can be written: not a folder, its folder exists (or is created) and accepts files."""
    if path.is_dir():
        raise ChunkKVError(f"{flag} {path} is a directory; give a file name")
    if create_folder:
        make_folder(path.parent, flag)
    elif not path.parent.is_dir():
        raise ChunkKVError(f"{flag} folder does not exist: {path.parent}")
    check_writable_folder(path.parent, flag)
    remove_stale_temps(path)


def make_folder(folder: Path, flag: str) -> None:
    """Create `folder` (and its parents) or fail with one line naming the flag."""
    if folder.exists() and not folder.is_dir():
        raise ChunkKVError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ChunkKVError(f"{flag}: cannot create the folder {folder}: {err.strerror or err}") from None


def check_writable_folder(folder: Path, flag: str) -> None:
    """Write and delete a probe file: permission bits alone miss read-only mounts and ACLs."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ChunkKVError(f"{flag}: cannot write in {folder}: {err.strerror or err}") from None


def temp_prefix(target: Path) -> str:
    """The name start of a temporary file for `target`; the pid tells later runs whose file it is."""
    return f".{target.name}.{os.getpid()}."


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete the temporary files of earlier runs for `target` whose process no longer exists."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\..*{re.escape(TEMP_SUFFIX)}$")
    removed = []
    folder = target.parent if target.parent.is_dir() else None
    for candidate in folder.iterdir() if folder else []:
        match = pattern.match(candidate.name)
        if match and candidate.is_file() and not _alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    # Our own pid counts as gone: this runs before this process writes its own temporary file, and
    # in a container a killed run often had the same pid.
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
