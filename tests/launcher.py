"""Start `python -m jobs.extract` runs fast: children of a fork server that imported torch once.

A run then costs about 0.3 s instead of 4 s. Each child is `python -m MODULE ARGS` with its own
pid, environment, stdout and stderr, signals, exit status and interpreter shutdown.
`LOGIT_EXTRACT_TEST_REAL_CLI=1` sends every run through a new `python -m` interpreter instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_CLI = os.environ.get("LOGIT_EXTRACT_TEST_REAL_CLI") == "1"
# A run or a start that takes longer hangs (runs take about 0.5 s, the fork server's start a few
# seconds): generous, so that a loaded machine is slow, not failing.
TIMEOUT = 600
BASE_ENV = {
    **{key: value for key, value in os.environ.items() if not key.startswith("LOGIT_EXTRACT_")},
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "LOGIT_EXTRACT_NO_REPORT": "1",  # as in conftest: no end-of-run report
    "LOGIT_EXTRACT_COMMIT_WORKERS": "1",  # as in conftest; a run's env may set another
}
SERVER = r"""
import gc, json, os, select, sys

import jobs  # the package only: jobs.extract itself runs as __main__ in each child
import lib.job, lib.inspect.summary  # torch, transformers, accelerate, pyarrow: the slow imports
import pandas, pyarrow.dataset  # imported by the job on first use
import boto3, lib.storage.s3  # what a job writing to s3:// imports (tests/test_s3.py)
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

try:  # a cache transformers builds on a first model load (1,000 regexes); no tensors involved
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    get_checkpoint_conversion_mapping("gpt2")
except ImportError:
    pass
gc.freeze()  # children do not collect the imported modules: their exit takes 0.3 s, not 1 s


def serve():
    # Fork a child per request line; report 'started ID PID' and 'exited ID STATUS'.
    running, pending = {}, b""
    while True:
        if select.select([0], [], [], 0.01)[0]:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return None  # the tests are done
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    return request
                running[pid] = request["id"]
                os.write(1, f"started {request['id']} {pid}\n".encode())
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            os.write(1, f"exited {running.pop(pid)} {status}\n".encode())


request = serve()
if request is None:
    sys.exit(0)
# The child: from here on it is `python -m MODULE ARGS` with the request's environment and files.
os.environ.update(request["env"])
if request.get("cwd"):
    os.chdir(request["cwd"])  # the repository's modules are imported already
for fd, path in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
    flags = os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    target = os.open(path, flags, 0o644)
    os.dup2(target, fd)
    os.close(target)
sys.argv = ["-m", *request["args"]]
import runpy

runpy._run_module_as_main(request["module"])
"""


# -- launching runs ----------------------------------------------------------------------------
@dataclass
class Result:
    """A finished run: exit status (negative: killed by that signal), stdout and stderr."""

    code: int
    stdout: str
    stderr: str
    hung: float | None = None  # the seconds after which a run that had not exited was killed

    @property
    def lines(self) -> list[str]:
        """stderr's lines other than the progress bar's (which redraws with carriage returns)."""
        lines = self.stderr.replace("\r", "\n").splitlines()
        return [line for line in lines if line.strip() and not line.startswith("extract:")]

    @property
    def errors(self) -> list[str]:
        return [line for line in self.lines if line.startswith("error:")]

    def assert_exit(self, code: int) -> None:
        """Exit status `code` and no traceback."""
        assert self.hung is None, f"no exit after {self.hung} s (killed): {self.stderr[-3000:]}"
        assert self.code == code, self.stderr[-3000:]
        assert "Traceback" not in self.stderr, self.stderr[-3000:]

    def assert_one_error(self, code: int, *fragments: str) -> str:
        """Exit status `code` and exactly one `error:` line, the last on stderr, holding every
        fragment."""
        self.assert_exit(code)
        [line] = self.errors
        assert self.stderr.endswith(line + "\n"), self.stderr[-3000:]
        for fragment in fragments:
            assert fragment in line, line
        return line

    def assert_ok(self) -> None:
        self.assert_exit(0)
        assert "Traceback" not in self.stderr and not self.errors, self.stderr[-3000:]


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Run:
    """One `python -m MODULE ARGS` process started by a `Launcher`; a small Popen."""

    def __init__(self, launcher: Launcher, number: int, files: tuple[Path, Path]):
        self.launcher = launcher
        self.number = number
        self.files = files
        self.pid = 0
        self.popen: subprocess.Popen | None = None

    def poll(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        return self.launcher.exit_codes.get(self.number)

    def send_signal(self, signum: int) -> None:
        """Signal the run if it is still running (a reaped pid may belong to another process)."""
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float = TIMEOUT) -> Result:
        """Wait for the exit and return the result; SIGKILL a run still there after `timeout`
        seconds (its result says so, and fails every assert_* check)."""
        hung = None
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                hung = timeout
                self.popen.kill()
                self.popen.wait()
        else:
            with self.launcher.changed:
                if not self.launcher.changed.wait_for(lambda: self.poll() is not None, timeout):
                    hung = timeout
                    kill(self.pid)
                    self.launcher.changed.wait_for(lambda: self.poll() is not None, 120)
        return Result(self.poll(), self.files[0].read_text(), self.files[1].read_text(), hung)

    def tail(self) -> str:
        return self.files[1].read_text()[-2000:]


class Launcher:
    """Starts runs as children of the fork server, or as real `python -m` processes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0
        self.exit_codes: dict[int, int] = {}
        self.pids: dict[int, int] = {}
        self.popens: list[subprocess.Popen] = []
        self.changed = threading.Condition()
        self.server: subprocess.Popen | None = None
        if not REAL_CLI:
            with open(folder / "server.err", "wb") as log:
                self.server = subprocess.Popen(
                    [sys.executable, "-c", SERVER],
                    cwd=ROOT,
                    env=BASE_ENV,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            threading.Thread(target=self._listen, name="fork-server", daemon=True).start()

    def _listen(self) -> None:
        for line in self.server.stdout:
            event, number, value = line.decode().split()
            with self.changed:
                if event == "started":
                    self.pids[int(number)] = int(value)
                else:
                    self.exit_codes[int(number)] = os.waitstatus_to_exitcode(int(value))
                self.changed.notify_all()

    def start(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        module: str = "jobs.extract",
        real: bool = False,
        cwd: Path | None = None,
    ) -> Run:
        """Start `python -m MODULE *args`, with `env` added to the base environment, in `cwd`
        (default: the repository); `real`: as a new interpreter even when the fork server is in
        use."""
        self.count += 1
        files = (self.folder / f"{self.count:03d}.out", self.folder / f"{self.count:03d}.err")
        run = Run(self, self.count, files)
        if REAL_CLI or real:
            with open(files[0], "wb") as out, open(files[1], "wb") as err:
                run.popen = subprocess.Popen(
                    [sys.executable, "-m", module, *args],
                    cwd=cwd or ROOT,
                    env={**BASE_ENV, "PYTHONPATH": str(ROOT), **(env or {})},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                )
            run.pid = run.popen.pid
            self.popens.append(run.popen)
            return run
        request = {"id": self.count, "module": module, "args": args, "env": env or {}}
        request["cwd"] = str(cwd) if cwd else None
        request.update(stdout=str(files[0]), stderr=str(files[1]))
        self.server.stdin.write((json.dumps(request) + "\n").encode())
        self.server.stdin.flush()
        with self.changed:
            if not self.changed.wait_for(lambda: self.count in self.pids, TIMEOUT):
                log = (self.folder / "server.err").read_text()[-3000:]
                pytest.fail(f"the fork server started no run: {log}")
        run.pid = self.pids[self.count]
        return run

    def close(self) -> None:
        """Kill what still runs, then the server (it has nothing to clean up)."""
        for popen in self.popens:
            if popen.poll() is None:
                popen.kill()
                popen.wait(30)
        if self.server is None:
            return
        with self.changed:
            running = [pid for n, pid in self.pids.items() if n not in self.exit_codes]
        for pid in running:
            kill(pid)
        self.server.kill()
        self.server.wait(30)


def rank_environments(world_size: int) -> list[dict[str, str]]:
    """The variables `accelerate launch` (torchrun) gives each of `world_size` local ranks, for
    ranks started with Launcher.start (a second `accelerate launch` costs 7-9 s of imports)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    shared = {"WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)}
    shared.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
    return [{**shared, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(world_size)]


def accelerate_launch(
    args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT
) -> tuple[int, str, str]:
    """`accelerate launch` of two CPU processes running `jobs.extract ARGS`; the exit status,
    stdout and stderr. The repository is on PYTHONPATH, so `cwd` may be anywhere."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",  # a free port: other jobs on this machine may hold 29500
        "-m",
        "jobs.extract",
        *args,
    ]
    environment = {k: v for k, v in os.environ.items() if k != "LOGIT_EXTRACT_CRASH_AT"}
    environment.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    environment["PYTHONPATH"] = str(ROOT)
    # A session of its own, so a hung run's torchrun workers can be killed with the launcher.
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, stdout, stderr
