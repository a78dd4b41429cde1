"""One job per output directory: a lease file that the live job renews and a dead job's expires.

The holder creates `_lock.json` exclusively (O_EXCL) with its host, pid and start time, and a
thread touches it every RENEW_S seconds. Another job that finds the file refuses to start while
the holder lives. On the holder's own machine "lives" means its process exists (checked by pid
and process start time, so a reused pid does not count); on another machine, that the file was
touched less than LEASE_S seconds ago. A dead holder's lease is moved aside and replaced, and
every commit first checks that the lease is still this job's, so a job that lost its lease (a
stalled node whose lease expired) stops instead of writing over its successor.

On S3 (lib/storage.py) every change to the lease is conditional on what it replaces: created
with `If-None-Match: *`, taken over from a dead holder and renewed with `If-Match` on the ETag
last seen, so no job ever overwrites a lease it did not read. On other object stores it is
written after a check and renewed by writing it again, and a dead holder's is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lib import storage
from lib.errors import UserError
from lib.storage import AnyPath, s3

log = logging.getLogger(__name__)

LEASE_S = 60.0  # a holder on another machine that has not renewed for this long is gone
RENEW_S = 5.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (Linux), None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def started_at(pid: int) -> float | None:
    """Unix time the process started (Linux), None where unknown."""
    ticks = _start_ticks(pid)
    if ticks is None:
        return None
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Process:
    """Who a process is, in a way that survives pid reuse and tells machines apart."""

    host: str
    boot: str
    pid: int
    start: int | None

    @classmethod
    def current(cls) -> Process:
        return cls.of(os.getpid())

    @classmethod
    def of(cls, pid: int) -> Process:
        """The process with this pid on this machine."""
        return cls(socket.gethostname(), _boot_id(), pid, _start_ticks(pid))

    @property
    def tag(self) -> str:
        """A file-name-safe tag: host@pid@start."""
        host = "".join(c if c.isalnum() or c in "-." else "_" for c in self.host)
        return f"{host}@{self.pid}@{self.start or 0}"

    def on_this_machine(self) -> bool:
        return self.host == socket.gethostname() and self.boot == _boot_id()

    def alive(self) -> bool:
        """Only meaningful on this machine: the process exists and is the same process."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        fields = _stat(self.pid)
        if fields is None:
            return True  # no /proc: the pid exists, which is all we can tell
        if fields[0] in ("Z", "X"):
            return False  # killed, not yet reaped by its parent
        return self.start is None or int(fields[19]) == self.start


def tag_alive(tag: str) -> bool | None:
    """Whether the process a `Process.tag` names is alive; None when it ran on another machine
    or the tag cannot be parsed."""
    try:
        host, pid, start = tag.rsplit("@", 2)
        pid, start = int(pid), int(start)
    except ValueError:
        return None
    me = Process.current()
    if host != me.tag.rsplit("@", 2)[0]:
        return None
    return Process(me.host, me.boot, pid, start or None).alive()


@dataclass
class Holder:
    process: Process
    token: str
    started: float
    touched: float  # the lease file's modification time
    etag: str | None = None  # S3: the version read, for a takeover conditional on it

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.process.pid} on {self.process.host}, started {when}"

    def alive(self) -> bool:
        if self.process.on_this_machine():
            return self.process.alive()
        return time.time() - self.touched < LEASE_S


def read_holder(path: AnyPath) -> Holder | None:
    """The lease's holder; None when there is no lease file. An unreadable one (a damaged disk,
    or a holder that has not finished writing it) reads as an unknown holder on another host."""
    touched, etag = time.time(), None
    try:
        if storage.is_s3(path):
            found = s3.read_tagged(path)
            if found is None:
                return None
            text, touched, etag = found
        else:
            touched = path.stat().st_mtime
            text = path.read_text()
        data = json.loads(text)
        process = Process(data["host"], data["boot"], int(data["pid"]), data.get("start"))
        return Holder(process, str(data["token"]), float(data["started"]), touched, etag)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Holder(Process("an unknown host", "", 0, None), "", touched, touched, etag)


def _in_use(out_dir: AnyPath, holder: Holder) -> str:
    """Why this job cannot start while `holder` lives, with the real wait when the lease's
    time lies in the future by this machine's clock (it then counts as live for longer)."""
    # Floored: "at least" stays true, and a stamp under a second ahead is no skew worth naming.
    ahead = int(holder.touched - time.time())
    if ahead >= 1 and not holder.process.on_this_machine():
        return (
            f"output.dir {out_dir} is in use by another job ({holder.describe()}); wait for it "
            f"to end or stop it (unless it is renewed, its lease expires in {ahead + LEASE_S:.0f} "
            f"s by this machine's clock: its last renewal is dated {ahead} s ahead of this "
            f"machine's clock, so the clocks disagree by at least {ahead} s)"
        )
    return (
        f"output.dir {out_dir} is in use by another job ({holder.describe()}); wait "
        f"for it to end or stop it (a job that died frees it at once on its own "
        f"machine, {LEASE_S:.0f} s after its last renewal from another machine)"
    )


class Lease:
    """This job's hold on an output directory, from `acquire()` to `release()`."""

    def __init__(self, path: AnyPath, token: str):
        self.path = path
        self.token = token
        self.lost: str | None = None
        self._content = b""
        self._etag: str | None = None  # S3: the ETag of the lease this job last wrote
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, out_dir: AnyPath) -> None:
        """Take the lease, or raise UserError naming the live holder."""
        me = Process.current()
        content = json.dumps(
            {
                "host": me.host,
                "boot": me.boot,
                "pid": me.pid,
                "start": me.start,
                "token": self.token,
                "started": time.time(),
            }
        ).encode()
        self._content = content
        for _ in range(10):
            if self._create():
                self._start_renewing()
                return
            holder = read_holder(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            if holder.alive():
                raise UserError(_in_use(out_dir, holder))
            if self._take_over(holder):
                log.warning(
                    "output.dir %s: took over from a job that is gone (%s)",
                    out_dir,
                    holder.describe(),
                )
                if storage.is_s3(self.path):  # the swap itself made the lease ours
                    self._start_renewing()
                    return
        raise UserError(f"output.dir {out_dir}: could not take {self.path.name}; try again")

    def _create(self) -> bool:
        """Create the lease only if there is none."""
        if storage.is_s3(self.path):
            self._etag = s3.create_tagged(self.path, self._content)
            return self._etag is not None
        return storage.create_exclusive(self.path, self._content)

    def _take_over(self, stale: Holder) -> bool:
        """Replace a dead holder's lease: on S3 by swapping ours in for the version read (then
        it is ours), elsewhere by removing it (then `_create` tries again)."""
        if storage.is_s3(self.path):
            if stale.etag is None:
                return False
            self._etag = s3.replace_tagged(self.path, self._content, stale.etag)
            return self._etag is not None
        return self._move_aside(stale)

    def _move_aside(self, stale: Holder) -> bool:
        """Remove a dead holder's lease, and only that one: if a live job replaced it between our
        look and our rename, put the live one back."""
        if storage.is_remote(self.path):
            # No rename on this object store: delete it if it is still the dead holder's. A live
            # job's lease written between our read and the delete is lost, and that job stops
            # at its next commit's check instead of sharing the directory.
            again = read_holder(self.path)
            if again is None or again.token != stale.token:
                return False
            self.path.unlink(missing_ok=True)
            return True
        aside = self.path.with_name(f".{self.path.name}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_holder(aside)
        if moved is not None and moved.token != stale.token:
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            holder = read_holder(self.path)
            if holder is None or holder.token != self.token:
                self.lost = "another job took it over" if holder else "its lease file was removed"
                return
            try:
                if storage.is_s3(self.path):
                    self._etag = s3.replace_tagged(self.path, self._content, self._etag)
                    if self._etag is None:  # replaced since our last write
                        self.lost = "another job took it over"
                        return
                else:
                    storage.touch(self.path, self._content)
            except OSError as exc:
                log.warning("cannot renew %s: %s", self.path, exc)

    def check(self) -> None:
        """Raise UserError unless the lease still has this job's token (called before every
        commit, on every rank: ranks other than the holder build a Lease with the same token)."""
        if self.lost is None:
            holder = read_holder(self.path)
            if holder is None or holder.token != self.token:
                self.lost = "another job took it over" if holder else "its lease file was removed"
        if self.lost:
            raise UserError(
                f"output.dir {self.path.parent}: this job lost its lease ({self.lost}); "
                "it stops without committing more"
            )

    def release(self) -> None:
        """Stop renewing and remove the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)
