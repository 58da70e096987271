"""The one error type commands raise (the CLI turns it into a red one-liner and an exit code), and notes."""

import functools
import logging


class ChunkKVError(Exception):
    """A problem the user can fix: bad input, unknown model, a file that cannot be read."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@functools.lru_cache(maxsize=None)
def note_once(message: str) -> None:
    """One line on stderr, once per process (a batch of questions would otherwise repeat it)."""
    logging.getLogger("chunkkv").warning("note: %s", message)
