"""The exceptions entry points turn into one line, and the helper that makes that line."""

from __future__ import annotations

import os
import re


class UserError(Exception):
    """A bad config, input or output location: shown to the user without a traceback."""


class OutputError(UserError):
    """The output directory could not be written (disk full, permissions, read-only, I/O)."""


class HostMemoryError(UserError):
    """The host ran out of memory where the job could catch it: exit 1, and a rerun resumes."""


def out_of_host_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation on the host that failed: Python's MemoryError, or torch's
    CPU allocator (a RuntimeError)."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
    )


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; a BaseException so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def first_line(exc: BaseException) -> str:
    """An exception's first line of text, or its type name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def one_line(text: str) -> str:
    """Any message folded onto a single line."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text.strip())


def output_error(path: os.PathLike | str, exc: BaseException) -> OutputError:
    """`cannot write PATH: No space left on device`, from an OSError or an Arrow I/O error."""
    errno = getattr(exc, "errno", None)
    cause = os.strerror(errno) if errno else first_line(exc)
    return OutputError(f"cannot write {path}: {cause}")
