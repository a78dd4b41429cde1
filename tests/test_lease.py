"""lib.output.lease: one job per output directory, and a dead holder never blocks the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib.errors import UserError
from lib.output import lease


def _holder_file(path, **fields) -> None:
    data = {"host": "elsewhere", "boot": "b", "pid": 12, "start": 34, "token": "t0"}
    path.write_text(json.dumps({**data, "started": time.time(), **fields}))


def test_acquire_refuse_release(tmp_path):
    path = tmp_path / "_lock.json"
    mine = lease.Lease(path, "a")
    mine.acquire(tmp_path)
    holder = lease.read_holder(path)
    assert (holder.token, holder.process.pid) == ("a", os.getpid())
    with pytest.raises(UserError, match=rf"is in use by another job \(pid {os.getpid()} on "):
        lease.Lease(path, "b").acquire(tmp_path)
    mine.check()  # still ours
    mine.release()
    assert not path.exists()
    lease.Lease(path, "b").acquire(tmp_path)


def test_a_dead_holder_on_this_machine_is_replaced_at_once(tmp_path):
    path = tmp_path / "_lock.json"
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    me = lease.Process.current()
    _holder_file(path, host=me.host, boot=me.boot, pid=int(child.stdout), start=1)
    successor = lease.Lease(path, "new")
    successor.acquire(tmp_path)
    assert lease.read_holder(path).token == "new"
    successor.release()


def test_a_live_holder_is_not_fooled_by_a_reused_pid(tmp_path):
    path = tmp_path / "_lock.json"
    me = lease.Process.current()
    _holder_file(path, host=me.host, boot=me.boot, pid=me.pid, start=(me.start or 0) + 1)
    lease.Lease(path, "new").acquire(tmp_path)  # our pid, another start time: that one is gone


def test_a_holder_on_another_machine_blocks_until_its_lease_expires(tmp_path):
    path = tmp_path / "_lock.json"
    _holder_file(path)
    with pytest.raises(UserError, match="pid 12 on elsewhere"):
        lease.Lease(path, "new").acquire(tmp_path)
    old = time.time() - lease.LEASE_S - 1
    os.utime(path, (old, old))
    taker = lease.Lease(path, "new")
    taker.acquire(tmp_path)
    # The old holder, should it wake up, sees that it lost the lease before its next commit.
    with pytest.raises(UserError, match="lost its lease"):
        lease.Lease(path, "t0").check()
    taker.release()


def test_a_lease_dated_in_the_future_says_the_real_wait_and_that_clocks_disagree(tmp_path):
    """Another host's lease 300 s ahead of our clock counts as live for 360 s, not 60."""
    path = tmp_path / "_lock.json"
    _holder_file(path)
    ahead = time.time() + 300.5
    os.utime(path, (ahead, ahead))
    with pytest.raises(UserError) as caught:
        lease.Lease(path, "new").acquire(tmp_path)
    message = str(caught.value)
    assert message.startswith(
        f"output.dir {tmp_path} is in use by another job (pid 12 on elsewhere"
    )
    assert message.endswith(
        "; wait for it to end or stop it (unless it is renewed, its lease expires in 360 s by "
        "this machine's clock: its last renewal is dated 300 s ahead of this machine's clock, "
        "so the clocks disagree by at least 300 s)"
    )
    assert lease.read_holder(path).token == "t0"  # left alone


def test_a_lease_of_this_machine_dated_in_the_future_keeps_the_usual_message(tmp_path):
    path = tmp_path / "_lock.json"
    mine = lease.Lease(path, "a")
    mine.acquire(tmp_path)
    ahead = time.time() + 300.5
    os.utime(path, (ahead, ahead))
    with pytest.raises(UserError) as caught:
        lease.Lease(path, "b").acquire(tmp_path)
    assert str(caught.value).endswith(
        "; wait for it to end or stop it (a job that died frees it at once on its own machine, "
        "60 s after its last renewal from another machine)"
    )
    mine.release()


def test_an_unreadable_lease_counts_by_its_age(tmp_path):
    path = tmp_path / "_lock.json"
    path.write_text("{")
    with pytest.raises(UserError, match="an unknown host"):
        lease.Lease(path, "new").acquire(tmp_path)
    old = time.time() - lease.LEASE_S - 1
    os.utime(path, (old, old))
    lease.Lease(path, "new").acquire(tmp_path)


def test_the_holder_renews_and_notices_a_takeover(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    path = tmp_path / "_lock.json"
    mine = lease.Lease(path, "a")
    mine.acquire(tmp_path)
    old = time.time() - 100
    os.utime(path, (old, old))
    deadline = time.monotonic() + 60
    while path.stat().st_mtime < old + 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.stat().st_mtime > old + 50  # touched by the renewal thread
    _holder_file(path, token="thief")
    while mine.lost is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(UserError, match="another job took it over"):
        mine.check()
    mine.release()
    assert lease.read_holder(path).token == "thief"  # not ours: left alone


def test_a_killed_holder_not_yet_reaped_is_dead(tmp_path):
    """A zombie still has a pid and a start time until its parent waits for it."""
    path = tmp_path / "_lock.json"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 300
    stat = Path(f"/proc/{child.pid}/stat")
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    held = lease.Process.of(child.pid)
    _holder_file(path, host=held.host, boot=held.boot, pid=held.pid, start=held.start)
    try:
        lease.Lease(path, "new").acquire(tmp_path)
    finally:
        child.wait()


def test_a_failed_lease_write_leaves_no_lease(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lease.os, "write", full)
    with pytest.raises(OSError):
        lease.Lease(tmp_path / "_lock.json", "a").acquire(tmp_path)
    assert not (tmp_path / "_lock.json").exists()
