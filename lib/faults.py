"""Test hooks that act at named points of the write path, set by environment variables.

- `LOGIT_EXTRACT_CRASH_AT=point[:N]`: SIGKILL this process the N-th time `point` is reached
  (default 1). Only a real kill leaves files the way a preempted job does.
- `LOGIT_EXTRACT_FAIL_AT=point[:N][=ERRNO]`: raise OSError (default ENOSPC) the N-th time, or
  MemoryError with `=MemoryError` (an allocation that failed).
- `LOGIT_EXTRACT_PAUSE_AT=point=SECONDS`: sleep every time `point` is reached, to widen a race.
- `LOGIT_EXTRACT_HOLD_AT=point[:N]=PATH`: from the N-th time `point` is reached, wait there
  until PATH exists: a test does its part while the job is held, then lets it go, however slow
  the machine.

Points: `forward`, `shard_write`, `shard_close`, `write`, `fsync`, `rename`, `before_rename`,
`between_record_and_shard`, `before_success`.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections import Counter

_seen: Counter = Counter()
_counting = threading.Lock()  # commit threads reach the same points at once


def _nth(spec: str, name: str) -> tuple[bool, int]:
    point, _, nth = spec.partition(":")
    return point == name, int(nth or 1)


def reset() -> None:
    """Count every point from zero again (for tests that set a hook in this process)."""
    _seen.clear()


def point(name: str, path: os.PathLike | str | None = None) -> None:
    """Kill, fail or pause here when an environment variable names this point."""
    crash = os.environ.get("LOGIT_EXTRACT_CRASH_AT")
    fail = os.environ.get("LOGIT_EXTRACT_FAIL_AT")
    pause = os.environ.get("LOGIT_EXTRACT_PAUSE_AT")
    hold = os.environ.get("LOGIT_EXTRACT_HOLD_AT")
    if not (crash or fail or pause or hold):
        return
    with _counting:
        _seen[name] += 1
        seen = _seen[name]
    if crash:
        match, nth = _nth(crash, name)
        if match and seen >= nth:
            os.kill(os.getpid(), signal.SIGKILL)
    if fail:
        spec, _, code = fail.partition("=")
        match, nth = _nth(spec, name)
        if match and seen == nth:
            if code == "MemoryError":
                raise MemoryError()
            number = getattr(errno, code or "ENOSPC")
            raise OSError(number, os.strerror(number), None if path is None else str(path))
    if pause:
        spec, _, seconds = pause.partition("=")
        if spec == name:
            time.sleep(float(seconds or 1))
    if hold:
        spec, _, release = hold.partition("=")
        match, nth = _nth(spec, name)
        while match and seen >= nth and not os.path.exists(release):
            time.sleep(0.01)
