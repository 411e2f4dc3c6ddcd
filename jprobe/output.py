"""Writing outputs atomically: a user never finds a half-written file, whatever fails."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import OutputError


def check_writable(output: str, option: str) -> None:
    """Refuse `output` unless a file can be made in its place, before work whose result would
    be lost (`jprobe run` checks --report before the program runs). `option` names the
    command-line option that chose `output`, for the error messages."""
    os.unlink(_temporary_beside(output, option))


def _temporary_beside(output: str, option: str) -> str:
    """A new empty file in `output`'s directory (so that a rename replaces `output`)."""
    directory = os.path.dirname(os.path.abspath(output)) or "."
    if not os.path.isdir(directory):
        raise OutputError(f"{output}: directory {directory} does not exist; create it or choose another {option}")
    if os.path.isdir(output):
        raise OutputError(f"{output}: is a directory; give the path of the file to write with {option}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".jprobe-", dir=directory)
    except OSError as e:
        raise OutputError(f"{output}: cannot create a file in {directory} ({e.strerror}); "
                          f"choose another {option}") from None
    os.close(fd)
    return tmp


@contextmanager
def replacing(output: str, option: str) -> Iterator[str]:
    """A temporary path beside `output`, renamed over it if the block succeeds, removed if not.

    `option` names the command-line option that chose `output`, for the error messages.
    """
    tmp = _temporary_beside(output, option)
    try:
        yield tmp
        try:
            os.replace(tmp, output)
        except OSError as e:
            raise OutputError(f"{output}: cannot write it ({e.strerror}); choose another {option}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
