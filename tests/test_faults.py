"""lib.faults: the test hooks act at the named point and the N-th time only."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lib import faults

ROOT = Path(__file__).resolve().parents[1]


def test_crash_point_kills_at_the_nth_time():
    code = (
        "from lib import faults\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    faults.point('before_rename')  # another point never fires\n"
        "    faults.point('shard_write')\n"
    )
    env = {**os.environ, "LOGIT_EXTRACT_CRASH_AT": "shard_write:3"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["0", "1", "2"]


def test_fail_point_raises_the_named_errno_once(monkeypatch):
    faults.reset()
    monkeypatch.setenv("LOGIT_EXTRACT_FAIL_AT", "rename:2=EACCES")
    faults.point("rename", "a")
    with pytest.raises(PermissionError) as caught:
        faults.point("rename", "b")
    assert (caught.value.errno, caught.value.filename) == (errno.EACCES, "b")
    faults.point("rename", "c")  # the N-th time only
