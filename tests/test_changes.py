"""What the job trusts, it checks, through the command line: inputs replaced, rewritten in place
or added while a job runs, foreign files in the data folders, temporaries of dead writers, text
that is not UTF-8 and a host out of memory. Every case ends in one `error:` line with nothing
wrong on disk, or in exit 0 with the clean run's rows; once the operator undoes the fault the
same command gives the clean run's rows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import extract
from lib import results, sample
from lib.errors import out_of_host_memory
from lib.inspect import run_stats
from lib.inspect.verify import verify
from lib.output.lease import Process
from tests.integrity import (
    UNITS,
    Clean,
    assert_clean,
    clean_run,
    edit_in_place,
    held,
    job_args,
    job_state,
    leftovers,
    read_tokens,
    shards,
    wait_until,
    write_corpus,
    zero_bytes,
)
from tests.launcher import Run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(launcher, model_dirs) -> str:
    """The tiny GPT-2 (requested after the launcher: the fork server imports meanwhile)."""
    return model_dirs["gpt2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("changes") / "corpus")


@pytest.fixture(scope="module")
def clean(launcher, model, inputs, tmp_path_factory) -> Clean:
    return clean_run(launcher, model, inputs, tmp_path_factory.mktemp("clean") / "out")


def held_job(launcher, args: list[str], out: Path, go: Path) -> Run:
    """A job whose writer waits at its second shard until `go` exists: the fault lands while
    it runs, however slow the machine."""
    job = launcher.start(args, held("shard_write:2", go))
    wait_until(lambda: shards(out), job, "a first shard")
    return job


def replace(path: Path, source: Path) -> None:
    """Replace `path` the way tools do: copy beside it, then rename over it."""
    temporary = path.with_name(path.name + ".tmp")
    shutil.copy(source, temporary)
    os.replace(temporary, path)


# -- inputs that change while the job runs -------------------------------------------------------
def test_an_input_replaced_mid_run_fails_the_job_then_finishes_once_restored(
    launcher, model, clean, tmp_path
):
    """b.parquet replaced by another corpus once the first shard is committed: the job reads on
    from the file it opened, but does not call the output complete over an input that is no
    longer on disk: exit 2 with one line, no _SUCCESS. A rerun refuses while the file differs;
    once it is restored the same command ends identical to the clean run."""
    corpus = Path(write_corpus(tmp_path / "corpus"))
    original = tmp_path / "b.original"
    shutil.copy(corpus / "b.parquet", original)
    other = tmp_path / "other.parquet"
    texts = sample.generate_texts(30, seed=8, mean_words=8)
    pq.write_table(pa.table({"text": texts, "doc_id": [f"new-{i}" for i in range(30)]}), other)
    out = tmp_path / "out"
    args = job_args(model, str(corpus), out)
    go = tmp_path / "go"
    job = held_job(launcher, args, out, go)
    replace(corpus / "b.parquet", other)
    go.touch()
    failed = job.wait()
    failed.assert_one_error(
        2, f"input file {corpus / 'b.parquet'} changed while the job ran", "restore it"
    )
    assert not (out / "_SUCCESS").exists() and leftovers(out) == []

    launcher.start(args).wait().assert_one_error(
        2, f"input file {corpus / 'b.parquet'} changed since this output was started"
    )
    replace(corpus / "b.parquet", original)
    launcher.start(args).wait().assert_ok()
    assert_clean(out, clean)


def test_an_input_rewritten_in_place_mid_run_fails_the_job_then_finishes_once_restored(
    launcher, model, clean, tmp_path
):
    """One letter of b.parquet changed in place (same size, same mtime) while the job runs: no
    unit reads the edited bytes into a shard, the job exits 2 with one line; with the bytes
    written back the same command ends identical to the clean run."""
    corpus = Path(write_corpus(tmp_path / "corpus"))
    path = corpus / "b.parquet"
    original = path.read_bytes()
    out = tmp_path / "out"
    args = job_args(model, str(corpus), out)
    go = tmp_path / "go"
    job = held_job(launcher, args, out, go)
    edit_in_place(path)
    go.touch()
    job.wait().assert_one_error(2, f"input file {path} changed while the job ran")
    assert not (out / "_SUCCESS").exists()

    with open(path, "r+b") as handle:  # the same file, its bytes put back
        handle.write(original)
    launcher.start(args).wait().assert_ok()
    assert_clean(out, clean)


def test_an_input_edited_after_the_last_check_is_found_by_verify(launcher, model, clean, tmp_path):
    """An edit that lands after the job's last look at its inputs (held just before _SUCCESS)
    cannot fail that run, which read the old bytes: verify --input finds the text differs from
    what the output read, the rerun refuses, and with the bytes back verify passes."""
    corpus = Path(write_corpus(tmp_path / "corpus"))
    path = corpus / "b.parquet"
    original = path.read_bytes()
    out = tmp_path / "out"
    args = job_args(model, str(corpus), out)
    go = tmp_path / "go"
    job = launcher.start(args, held("before_success", go))
    wait_until(lambda: (out / "_manifest.json").exists(), job, "the manifest")
    edit_in_place(path)
    go.touch()
    job.wait().assert_ok()
    assert read_tokens(out).equals(clean.table)  # the rows of the bytes it read

    report = verify(out, check_input=True)
    assert report.problems == [
        f"input file {path} is not the one this output read (its bytes are not those the job "
        "started with)"
    ]
    launcher.start(args).wait().assert_one_error(2, f"input file {path} changed since this output")
    path.write_bytes(original)
    assert verify(out, check_input=True).problems == []


def test_an_input_added_mid_run_fails_the_job_then_finishes_once_removed(
    launcher, model, clean, tmp_path
):
    """A third file dropped into the input folder while the job runs: the output would not
    account for its rows, so the job exits 2 naming it; once it is gone the same command ends
    identical to the clean run."""
    corpus = Path(write_corpus(tmp_path / "corpus"))
    out = tmp_path / "out"
    args = job_args(model, str(corpus), out)
    go = tmp_path / "go"
    job = held_job(launcher, args, out, go)
    added = corpus / "c.parquet"
    shutil.copy(corpus / "a.parquet", added)
    go.touch()
    job.wait().assert_one_error(2, f"input file {added} appeared under input.path")
    added.unlink()
    launcher.start(args).wait().assert_ok()
    assert_clean(out, clean)


# -- shards damaged after their commit, before _SUCCESS -------------------------------------------
def test_a_shard_damaged_mid_run_keeps_success_away(launcher, model, inputs, clean, tmp_path):
    """The first shard's bytes zeroed in place (same size) once it is committed: before
    _SUCCESS the job hashes every shard against its record, exits 2 naming it, and the same
    command recomputes it and ends identical to the clean run."""
    out = tmp_path / "out"
    args = job_args(model, inputs, out)
    go = tmp_path / "go"
    job = held_job(launcher, args, out, go)
    zero_bytes(out / "tokens" / "part-00000.parquet")
    go.touch()
    job.wait().assert_one_error(
        2, f"output.dir {out}: shard tokens/part-00000.parquet changed after it was committed"
    )
    assert not (out / "_SUCCESS").exists()
    launcher.start(args).wait().assert_ok()
    assert_clean(out, clean)


# -- the data folders hold exactly the manifest's shards -----------------------------------------
def test_foreign_files_in_a_finished_output_are_refused_not_read(
    launcher, model, inputs, clean, tmp_path
):
    """Copies of a shard dropped into tokens/ after success, under names readers would read (a
    copy, a planned unit's number beyond the plan, a folder): the rerun refuses in one line
    naming the first and counting the rest, and touches nothing; `jobs.verify` names each;
    once they are moved away the rerun says the job is complete."""
    out = Path(shutil.copytree(clean.out, tmp_path / "out"))
    foreign = ["tokens/part-00001 (copy).parquet", "tokens/part-00099.parquet", "tokens/old"]
    (out / "tokens/old").mkdir()
    for name in (*foreign[:2], "tokens/old/part-00001.parquet"):
        shutil.copy(out / "tokens/part-00001.parquet", out / name)
    (out / "tokens/.part-00001.parquet.crc").write_bytes(b"hidden: every reader skips it")
    before = job_state(out)
    args = job_args(model, inputs, out)
    launcher.start(args).wait().assert_one_error(
        2,
        f"output.dir {out}: tokens/old (and 2 more) is not a shard of this job",
        "move it out of tokens/",
    )
    assert job_state(out) == before
    check = launcher.start([str(out)], module="jobs.verify").wait()
    assert check.code == 1
    for name in foreign:
        assert f"{name} is not listed in the manifest" in check.stderr
    assert ".crc" not in check.stderr
    # The project's readers and the report read the job's shards only.
    rows = len(read_tokens(clean.out))
    assert len(results.load_arrays(out)["position"]) == rows
    assert run_stats.scan_tokens(run_stats.read_run(out)).positions == rows

    for name in foreign:
        shutil.move(out / name, tmp_path / name.replace("/", "-"))
    rerun = launcher.start(args).wait()
    rerun.assert_ok()
    assert "already complete" in rerun.stdout
    assert_clean(out, clean)


def test_a_foreign_file_is_never_deleted_by_a_resume(launcher, model, inputs, clean, tmp_path):
    """A job killed after 3 shards, then a file of the user's in tokens/: the resume refuses
    (it used to delete it with the unproven shards); once moved away the resume equals the
    clean run."""
    out = tmp_path / "out"
    args = job_args(model, inputs, out)
    crashed = launcher.start(args, {"LOGIT_EXTRACT_CRASH_AT": "shard_close:4"}).wait()
    assert crashed.code < 0 and len(shards(out)) == 3
    foreign = out / "tokens" / "notes.parquet"
    pq.write_table(pa.table({"note": ["mine"]}), foreign)
    launcher.start(args).wait().assert_one_error(2, "tokens/notes.parquet is not a shard")
    assert foreign.exists() and len(shards(out)) == 4
    foreign.unlink()
    launcher.start(args).wait().assert_ok()
    assert_clean(out, clean)


def test_a_foreign_file_dropped_mid_run_keeps_success_away(
    launcher, model, inputs, clean, tmp_path
):
    """A file dropped into tokens/ while the job runs: the job does not write _SUCCESS over a
    folder that reads as more rows than it wrote; once it is moved away the same command ends
    identical to the clean run."""
    out = tmp_path / "out"
    args = job_args(model, inputs, out)
    go = tmp_path / "go"
    job = held_job(launcher, args, out, go)
    foreign = out / "tokens" / "extra.parquet"
    shutil.copy(out / "tokens" / "part-00000.parquet", foreign)
    go.touch()
    job.wait().assert_one_error(2, "tokens/extra.parquet is not a shard of this job")
    assert not (out / "_SUCCESS").exists() and len(shards(out)) == UNITS + 1
    foreign.unlink()
    launcher.start(args).wait().assert_ok()
    assert_clean(out, clean)


# -- temporaries of dead writers -----------------------------------------------------------------
def test_a_killed_report_leaves_a_warning_until_the_next_report(launcher, clean, tmp_path):
    """`jobs.report` SIGKILLed while writing leaves its temporary: `jobs.verify` passes with a
    warning naming it (a dead writer's), the next `jobs.report` removes it; a live writer's
    temporary is left alone, and verify warns about it."""
    out = Path(shutil.copytree(clean.out, tmp_path / "out"))
    killed = launcher.start([str(out)], {"LOGIT_EXTRACT_CRASH_AT": "write"}, module="jobs.report")
    assert killed.wait().code < 0
    [left] = list((out / "_tmp").iterdir())
    assert left.name.startswith("_report.html@")

    check = launcher.start([str(out)], module="jobs.verify").wait()
    check.assert_exit(0)
    assert f"warning: {out}: temporary file _tmp/{left.name} was left by a writer" in check.stderr
    assert check.stdout.startswith(f"OK {out}")

    live = out / "_tmp" / f"_report.html@{Process.current().tag}.tmp"  # this test's own
    live.write_bytes(b"<html")
    launcher.start([str(out)], module="jobs.report").wait().assert_exit(0)
    assert list((out / "_tmp").iterdir()) == [live] and (out / "_report.html").is_file()
    # Beside _SUCCESS no writer of data runs: a live writer's temporary, another machine's or a
    # stray file is a warning too, never a failure that only deleting it by hand would end.
    stray = [out / "_tmp" / "part-00003.parquet@node7@4242@1111.tmp", out / "_tmp" / "junk"]
    for path in stray:
        path.write_bytes(b"PAR1")
    check = launcher.start([str(out)], module="jobs.verify").wait()
    check.assert_exit(0)
    for path in (live, *stray):
        assert f"temporary file _tmp/{path.name} is not part of the output" in check.stderr
    for path in (live, *stray):
        path.unlink()
    assert verify(out, check_input=True).warnings == []


def test_a_finished_rerun_removes_dead_writers_temporaries(
    launcher, model, inputs, clean, tmp_path
):
    """The rerun of a finished job removes a temporary whose writer is known dead (and writes
    nothing else)."""
    out = Path(shutil.copytree(clean.out, tmp_path / "out"))
    # this machine, a pid that lives but another start time: a writer that is gone
    dead = out / "_tmp" / f"_report.html@{Process.current().tag.rsplit('@', 1)[0]}@1.tmp"
    dead.write_bytes(b"<html")
    before = job_state(out)
    rerun = launcher.start(job_args(model, inputs, out)).wait()
    rerun.assert_ok()
    assert not dead.exists() and job_state(out) == before
    assert_clean(out, clean)


# -- text that is not UTF-8 -------------------------------------------------------------------
def test_text_that_is_not_utf8_is_skipped_with_a_reason(model_dirs, tmp_path):
    """A text column holding bytes that are not UTF-8 (a binary column viewed as text): the row
    is skipped with reason `invalid_utf8_text` and every other row scores exactly as in a run
    where that row is null; `jobs.verify --input` accounts for every id."""
    texts = sample.generate_texts(12, seed=3, mean_words=6)
    raw = pa.array([t.encode() for t in texts], pa.binary()).to_pylist()
    raw[4] = b"\xff\xfe not text"
    ids = [f"r{i}" for i in range(12)]
    broken = tmp_path / "broken"
    broken.mkdir()
    as_text = pa.array(raw, pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": as_text, "doc_id": ids}), broken / "a.parquet")
    nulled = tmp_path / "nulled"
    nulled.mkdir()
    texts[4] = None
    pq.write_table(pa.table({"text": texts, "doc_id": ids}), nulled / "a.parquet")

    def run(corpus: Path) -> Path:
        out = tmp_path / f"out-{corpus.name}"
        args = [
            f"model.path={model_dirs['gpt2']}",
            f"input.path={corpus}",
            "input.id_column=doc_id",
            f"output.dir={out}",
            "runtime.threads=1",
        ]
        assert extract.main(args) == 0
        return out

    out, reference = run(broken), run(nulled)
    skipped = pq.read_table(out / "_skipped/skipped.parquet").to_pylist()
    assert skipped == [{"id": "r4", "reason": "invalid_utf8_text"}]
    rows = pq.read_table(out / "tokens").sort_by([("id", "ascending"), ("position", "ascending")])
    expected = pq.read_table(reference / "tokens").sort_by(
        [("id", "ascending"), ("position", "ascending")]
    )
    assert rows.num_rows > 0 and rows.equals(expected)
    assert verify(out, check_input=True).problems == []


# -- a host out of memory ---------------------------------------------------------------------
def test_host_out_of_memory_is_one_line_and_resumes(launcher, model, inputs, clean, tmp_path):
    """An allocation that fails during the third batch: exit 1 with one line naming the setting
    to lower, nothing left behind; the same command resumes to the clean run."""
    out = tmp_path / "out"
    args = job_args(model, inputs, out)
    env = {"LOGIT_EXTRACT_FAIL_AT": "forward:3=MemoryError"}
    failed = launcher.start(args, env).wait()
    failed.assert_one_error(
        1, "error: out of host memory in a batch of ", "lower batching.max_tokens (now 64)"
    )
    assert leftovers(out) == [] and not (out / "_SUCCESS").exists()
    launcher.start(args).wait().assert_ok()
    assert_clean(out, clean)


def test_torchs_failed_host_allocation_counts_as_out_of_memory():
    """What torch raises for a CPU allocation that cannot be made is recognised."""
    with pytest.raises(RuntimeError) as failed:
        torch.empty(1 << 50, dtype=torch.uint8)
    assert out_of_host_memory(failed.value)
    assert out_of_host_memory(MemoryError())
    assert not out_of_host_memory(RuntimeError("shape mismatch"))
