"""Integrity under operator faults, through the command line `python -m jobs.extract key=value`.

Two jobs on one directory, kills, signals, full disks (injected and real), inputs edited in
place, damaged shards and lost bookkeeping: every scenario ends either with output identical to
an uninterrupted run (the sorted token table bit for bit, the manifest's shard checksums,
`lib.inspect.verify` clean, nothing left in `_tmp`) or with a one-line refusal, never with a traceback.

Speed: `python -m jobs.extract` spends about 4 s importing torch and transformers, which would
put this file's ~50 runs at several minutes on 2 cores. Runs therefore start from a fork server
(`SERVER`): a process that has done those imports once and forks a child per run. The child
becomes `python -m jobs.extract ARGS` the way the interpreter's `-m` does it
(`runpy._run_module_as_main`): its own pid, environment, stdin/stdout/stderr, signal handlers,
exit status and interpreter shutdown. One test always starts the real interpreter command, and
LOGIT_EXTRACT_TEST_REAL_CLI=1 sends every run through it (several times slower, same checks).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib import sample
from tests.integrity import (
    ROOT,
    UNITS,
    Clean,
    assert_clean,
    clean_run,
    edit_in_place,
    held,
    holder_pid,
    job_args,
    job_state,
    leftovers,
    read_clean,
    shards,
    snapshot,
    stopped_line,
    wait_until,
    write_corpus,
    zero_bytes,
)
from tests.launcher import BASE_ENV, Result

pytestmark = pytest.mark.slow


# -- the corpus, the clean run and what "identical" means --------------------------------------
@pytest.fixture(scope="module")
def model(launcher, model_dirs) -> str:
    """The tiny GPT-2 (requested after the launcher: the fork server imports meanwhile)."""
    return model_dirs["gpt2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def inputs(root) -> str:
    return write_corpus(root / "corpus")


@pytest.fixture(scope="module")
def clean(launcher, model, inputs, root) -> Clean:
    return clean_run(launcher, model, inputs, root / "clean")


# -- 1. two jobs on one directory -------------------------------------------------------------
def test_second_job_is_refused_while_the_first_runs(launcher, model, inputs, clean, tmp_path):
    """While job A works (held before its end), the same command is refused with one line
    naming A's pid, and a third copy stopped by SIGINT while still starting (a real
    `python -m`, in its torch import) exits 130 with one line. Neither touches A's lease or
    work: A's output equals the clean run."""
    out, go = tmp_path / "out", tmp_path / "go"
    args = job_args(model, inputs, out)
    a = launcher.start(args, held("before_success", go))  # holds its lease until `go`
    wait_until(lambda: shards(out), a, "a first shard")
    b = launcher.start(args)
    c = launcher.start(args, real=True)

    def importing_torch() -> bool:
        try:
            return "libtorch" in Path(f"/proc/{c.pid}/maps").read_text()
        except OSError:
            return False

    wait_until(importing_torch, c, "the torch import")
    c.send_signal(signal.SIGINT)

    refused = b.wait()
    refused.assert_one_error(2, f"output.dir {out} is in use by another job", f"(pid {a.pid} ")
    assert refused.stdout == ""
    interrupted = c.wait()
    interrupted.assert_exit(130)
    assert re.fullmatch(
        rf"stopped by SIGINT: \d shards committed in {re.escape(str(out))}; "
        "run the same command to resume",
        "\n".join(interrupted.lines),
    ), interrupted.stderr
    assert a.poll() is None and holder_pid(out) == a.pid
    go.touch()
    a.wait().assert_ok()
    assert_clean(out, clean)


def test_killed_job_does_not_block_the_next(launcher, model, inputs, clean, tmp_path):
    """Job A is SIGKILLed after committing 3 shards, with a 4th in its temporary and its lease
    still on disk: the same command takes over at once, says so, drops A's temporary and ends
    identical to the clean run."""
    out = tmp_path / "out"
    args = job_args(model, inputs, out)
    a = launcher.start(args, {"LOGIT_EXTRACT_CRASH_AT": "shard_write:4"})
    assert a.wait().code == -signal.SIGKILL
    assert len(shards(out)) == 3
    assert holder_pid(out) == a.pid
    assert [p.name for p in (out / "_tmp").iterdir() if f"@{a.pid}@" in p.name]

    b = launcher.start(args).wait()
    b.assert_ok()
    assert f"took over from a job that is gone (pid {a.pid} " in b.stderr
    assert_clean(out, clean)


HOLD_AND_DIE = """
import os, signal, sys
from pathlib import Path
from lib.output.lease import Lease

out = Path(sys.argv[1])
Lease(out / "_lock.json", "killed-job").acquire(out)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_job_not_yet_reaped_does_not_block_the_next(
    launcher, model, inputs, clean, tmp_path
):
    """A process that took OUT's lease (with lib.output.lease, as the job does) and was SIGKILLed is
    dead even before its parent reaps it (a zombie, whose pid and /proc entry remain): the same
    command takes over at once."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_DIE, str(out)], cwd=ROOT, env=BASE_ENV
    )
    try:
        deadline = time.monotonic() + 300
        while Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the lease holder did not die"
            time.sleep(0.01)
        assert holder_pid(out) == holder.pid
        rerun = launcher.start(job_args(model, inputs, out)).wait()
        rerun.assert_ok()
        assert_clean(out, clean)
    finally:
        holder.wait(30)


# -- 2. an input file edited in place -----------------------------------------------------------


def test_input_edited_in_place_is_refused_until_overwrite(launcher, model, clean, tmp_path):
    """A job killed after 3 shards; then one letter of an input text changes in place, with the
    file's size and mtime kept. The rerun refuses in one line naming the file and changes
    nothing; with output.overwrite=true it starts over and equals a clean run on the edited
    input (which differs from the original output)."""
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = job_args(model, corpus, out)
    crashed = launcher.start(args, {"LOGIT_EXTRACT_CRASH_AT": "shard_close:4"}).wait()
    assert crashed.code == -signal.SIGKILL, crashed.stderr
    assert len(shards(out)) == 3
    edited = Path(corpus) / "b.parquet"
    edit_in_place(edited)

    before = job_state(out)
    refused = launcher.start(args).wait()
    refused.assert_one_error(2, f"input file {edited} changed since this output was started")
    assert job_state(out) == before

    expected_out = tmp_path / "expected"
    overwrite = launcher.start([*args, "output.overwrite=true"])
    reference = launcher.start(job_args(model, corpus, expected_out))
    overwrite.wait().assert_ok()
    reference.wait().assert_ok()
    expected = read_clean(expected_out)
    assert not expected.table.equals(clean.table)  # the edit changed the output
    assert_clean(out, expected)


# -- 3. damaged shards --------------------------------------------------------------------------


def test_damaged_shards_are_found_and_recomputed(launcher, model, inputs, clean, tmp_path):
    """In a finished output, 8 bytes of one shard are zeroed and another is cut to half its
    size: `python -m jobs.verify` exits 1 naming both; the rerun recomputes exactly those two,
    says so, keeps the others and ends identical to the clean run."""
    out = Path(shutil.copytree(clean.out, tmp_path / "out"))
    flipped, truncated = out / "tokens/part-00001.parquet", out / "tokens/part-00004.parquet"
    zero_bytes(flipped)
    os.truncate(truncated, truncated.stat().st_size // 2)
    kept = {p: p.stat().st_ino for p in (out / "tokens").iterdir() if p not in (flipped, truncated)}

    check = launcher.start([str(out)], module="jobs.verify").wait()
    assert check.code == 1 and "Traceback" not in check.stderr, check.stderr
    problems = check.stderr.splitlines()
    for name in ("tokens/part-00001.parquet", "tokens/part-00004.parquet"):
        assert any(name in line for line in problems), check.stderr
    assert not any("part-00000" in line for line in problems), check.stderr

    rerun = launcher.start(job_args(model, inputs, out)).wait()
    rerun.assert_ok()
    assert re.search(
        r"recomputed\s+2 shards damaged, missing or unrecorded: "
        r"tokens/part-00001.parquet, tokens/part-00004.parquet\n",
        rerun.stdout,
    ), rerun.stdout
    for name in ("tokens/part-00001.parquet", "tokens/part-00004.parquet"):
        assert f"claim: shard {name} failed its checksum; recomputing its unit" in rerun.stderr
    assert {p: p.stat().st_ino for p in kept} == kept  # the sound shards were not rewritten
    assert_clean(out, clean)


# -- 4. lost or damaged bookkeeping -------------------------------------------------------------
def _delete(path: Path) -> None:
    path.unlink()


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garble(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])  # cut inside the JSON object


METADATA_CASES = {  # case -> (file, damage, shard the rerun must recompute)
    "manifest-deleted": ("_manifest.json", _delete, None),
    "manifest-emptied": ("_manifest.json", _empty, None),
    "job-deleted": ("_job.json", _delete, None),
    "job-emptied": ("_job.json", _empty, None),
    "record-deleted": ("_units/part-00003.json", _delete, "tokens/part-00003.parquet"),
    "record-emptied": ("_units/part-00003.json", _empty, "tokens/part-00003.parquet"),
    "record-garbled": ("_units/part-00003.json", _garble, "tokens/part-00003.parquet"),
    "success-deleted": ("_SUCCESS", _delete, None),
    "skipped-deleted": ("_skipped/skipped.parquet", _delete, None),
}


@pytest.fixture(scope="module")
def metadata_reruns(launcher, model, inputs, clean, root) -> dict[str, tuple[Path, Result]]:
    """Each case's damage to its own copy of the clean output, then all reruns at once."""
    runs = {}
    for case, (name, damage, _) in METADATA_CASES.items():
        out = Path(shutil.copytree(clean.out, root / "metadata" / case))
        damage(out / name)
        runs[case] = (out, launcher.start(job_args(model, inputs, out)))
    return {case: (out, run.wait()) for case, (out, run) in runs.items()}


@pytest.mark.parametrize("case", METADATA_CASES)
def test_lost_bookkeeping_heals(case, metadata_reruns, clean):
    """A deleted, emptied or garbled manifest, job record, unit record, success marker or skip
    list: the rerun exits 0 without a traceback and the output equals the clean run; a shard
    whose record is gone is recomputed, and the summary says so."""
    out, rerun = metadata_reruns[case]
    rerun.assert_ok()
    recomputed = METADATA_CASES[case][2]
    if recomputed:
        assert re.search(rf"recomputed\s+1 shard .*: {recomputed}\n", rerun.stdout), rerun.stdout
        assert f"claim: shard {recomputed} has no readable record; recomputing" in rerun.stderr
    else:
        assert "recomputed" not in rerun.stdout
    assert_clean(out, clean)


# -- 5. a full disk -----------------------------------------------------------------------------
# LOGIT_EXTRACT_FAIL_AT=point:N -> shards committed before the failure. Each run reaches the
# points in one order: _job.json's write, fsync and rename (1), then per unit the shard (write,
# fsync of the closed temporary, rename) and its record (write, fsync, rename: the record
# before the shard), then _skipped/skipped.parquet, _manifest.json and _SUCCESS.
DISK_FULL_CASES = {
    "write:1": 0,  # _job.json, before any shard
    "write:6": 2,  # the third shard's rows
    "fsync:1": 0,  # _job.json
    "fsync:6": 2,  # the third shard's temporary
    "rename:1": 0,  # _job.json
    "rename:6": 2,  # the third shard's unit record
    f"rename:{1 + 2 * UNITS + 3}": UNITS,  # _SUCCESS, after the manifest
    "shard_close:1": 0,
    "shard_close:3": 2,
}


@pytest.fixture(scope="module")
def disk_full_runs(launcher, model, inputs, root) -> dict[str, dict]:
    """Each injected ENOSPC in a directory of its own, all at once; what each failed run left;
    then the reruns without the fault, all at once."""
    cases = {}
    for fault in DISK_FULL_CASES:
        out = root / "disk-full" / fault.replace(":", "-")
        env = {"LOGIT_EXTRACT_FAIL_AT": fault}
        cases[fault] = {"out": out, "run": launcher.start(job_args(model, inputs, out), env)}
    for case in cases.values():
        out = case["out"]
        case["failed"] = case.pop("run").wait()
        case.update(shards=shards(out), leftovers=leftovers(out))
        case["success"] = (out / "_SUCCESS").exists()
    reruns = {
        fault: launcher.start(job_args(model, inputs, c["out"])) for fault, c in cases.items()
    }
    for fault, run in reruns.items():
        cases[fault]["rerun"] = run.wait()
    return cases


@pytest.mark.parametrize("fault", DISK_FULL_CASES)
def test_injected_disk_full_then_rerun(fault, disk_full_runs, clean):
    """ENOSPC at a write, fsync, rename or shard close, the first time or later: exit 1 with one
    line `error: cannot write PATH: No space left on device`, no temporary or lease left, the
    shards committed before kept; the rerun without the fault equals the clean run."""
    case = disk_full_runs[fault]
    out, failed = case["out"], case["failed"]
    line = failed.assert_one_error(1)
    assert re.fullmatch(
        rf"error: cannot write {re.escape(str(out))}/\S+: No space left on device", line
    ), line
    assert case["leftovers"] == []
    assert len(case["shards"]) == DISK_FULL_CASES[fault]
    assert not case["success"]
    case["rerun"].assert_ok()
    assert_clean(out, clean)


class Tmpfs:
    """A tmpfs of a given size at `path`, or a skip where mounting is not allowed."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def resize(self, size: str) -> None:
        subprocess.run(
            ["mount", "-o", f"remount,size={size}", str(self.path)], check=True, timeout=30
        )

    def __enter__(self) -> Tmpfs:
        return self

    def __exit__(self, *exc) -> None:
        if subprocess.run(["umount", str(self.path)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], timeout=30)


def test_real_disk_full_then_more_space(launcher, model, inputs, clean, tmp_path):
    """A tmpfs with room for two shards: the run exits 1 with one `No space left on device`
    line and leaves no temporary or lease; after the filesystem grows, the rerun equals the
    clean run."""
    with Tmpfs(tmp_path / "small", "40k") as disk:
        out = disk.path / "out"
        args = job_args(model, inputs, out)
        failed = launcher.start(args).wait()
        failed.assert_one_error(1, "error: cannot write", ": No space left on device")
        assert leftovers(out) == []
        assert len(shards(out)) < UNITS and not (out / "_SUCCESS").exists()
        disk.resize("2m")
        launcher.start(args).wait().assert_ok()
        assert_clean(out, clean)


def test_disk_full_at_start_then_space_freed(launcher, model, inputs, clean, tmp_path):
    """A filesystem already full when the job starts (even the lease cannot be written): exit 1
    with one line and nothing left behind, not even an empty lease that would read as another
    job's; once space is freed, the same command runs and equals the clean run."""
    with Tmpfs(tmp_path / "full", "1m") as disk:
        filler = disk.path / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, bytes(4096)):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        out = disk.path / "out"
        args = job_args(model, inputs, out)
        failed = launcher.start(args).wait()
        failed.assert_one_error(1, f"error: cannot write {out}", ": No space left on device")
        filler.unlink()
        assert leftovers(out) == []
        launcher.start(args).wait().assert_ok()
        assert_clean(out, clean)


def test_output_error_while_the_next_unit_is_read(launcher, model, tmp_path):
    """ENOSPC at the first shard while the loader is still tokenizing the second unit (six long
    texts) and the main thread waits for it: the job still exits 1 at once (it used to wait
    forever for a loader that had stopped) with one error line, and leaves nothing behind."""
    texts = sample.generate_texts(12, seed=5, mean_words=8)
    long_text = " ".join(sample.generate_texts(400, seed=6, mean_words=8))  # about 33 kB
    texts[6:] = [long_text] * 6
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(
        pa.table({"text": texts, "doc_id": [f"d{i}" for i in range(12)]}), corpus / "a.parquet"
    )
    out = tmp_path / "out"
    env = {"LOGIT_EXTRACT_FAIL_AT": "shard_close:1"}
    failed = launcher.start(job_args(model, str(corpus), out), env).wait()
    failed.assert_one_error(1, "No space left on device")
    assert leftovers(out) == [] and shards(out) == []


# -- 6. SIGINT and SIGTERM ----------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_then_resume(signum, launcher, model, inputs, clean, tmp_path):
    """A signal once the first shard is committed: exit 128+N, one line saying how many shards
    are committed and to run the same command, no traceback, no temporary or lease left; the
    same command then finishes identical to the clean run."""
    out, go = tmp_path / "out", tmp_path / "go"
    args = job_args(model, inputs, out)
    job = launcher.start(args, held("shard_write:2", go))  # the writer waits at its 2nd shard
    wait_until(lambda: shards(out), job, "a first shard")
    job.send_signal(signum)
    go.touch()
    stopped = job.wait()
    stopped.assert_exit(128 + signum)
    stopped_line(stopped, signal.Signals(signum).name, out, len(shards(out)))
    assert leftovers(out) == []
    assert len(shards(out)) < UNITS and not (out / "_SUCCESS").exists()
    launcher.start(args).wait().assert_ok()
    assert_clean(out, clean)


def test_signal_while_the_last_shards_are_written(launcher, model, inputs, clean, tmp_path):
    """SIGTERM once every batch is computed and only the last two shards are still being written
    (the job is waiting for its writer thread): the same one-line stop as mid-run, last on
    stderr (not glued to a progress bar that is redrawn after it), nothing left behind, and the
    rerun equals the clean run."""
    out, go = tmp_path / "out", tmp_path / "go"
    args = job_args(model, inputs, out)
    # The writer waits at the 8th of 9 shards; the last two units' batches fit in its queue,
    # so the model is done by then.
    job = launcher.start(args, held(f"shard_write:{UNITS - 1}", go))
    wait_until(lambda: len(shards(out)) >= UNITS - 2, job, "all shards but the last two")
    job.send_signal(signal.SIGTERM)
    go.touch()
    stopped = job.wait()
    stopped.assert_exit(143)
    assert leftovers(out) == [] and not (out / "_SUCCESS").exists()
    committed = len(shards(out))
    launcher.start(args).wait().assert_ok()
    assert_clean(out, clean)
    stopped_line(stopped, "SIGTERM", out, committed)


# -- 7. output and input in each other ----------------------------------------------------------
@pytest.mark.parametrize("layout", ["inside-input-dir", "matched-by-input-glob", "holds-input"])
def test_output_and_input_overlap_is_refused(layout, launcher, model, tmp_path):
    """output.dir inside the input directory, matched by an input glob such as
    DIR/**/*.parquet, or holding the input: exit 2 with one line before anything is written
    (no output folder, no lease, not even for a moment)."""
    if layout == "inside-input-dir":
        corpus = write_corpus(tmp_path / "data")
        out, fragment = tmp_path / "data" / "out", f"is inside input.path {corpus}"
    elif layout == "matched-by-input-glob":
        write_corpus(tmp_path / "data" / "texts")
        corpus = f"{tmp_path}/data/**/*.parquet"
        out, fragment = tmp_path / "data" / "out", f"input.path {corpus} matches the job's own"
    else:
        corpus = write_corpus(tmp_path / "out" / "corpus")
        out, fragment = tmp_path / "out", f"output.dir {tmp_path / 'out'} holds input file"
    before = snapshot(tmp_path)
    refused = launcher.start(job_args(model, corpus, out)).wait()
    refused.assert_one_error(2, fragment, "output.dir")
    assert snapshot(tmp_path) == before
