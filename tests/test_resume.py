"""Real kills: the job in a subprocess SIGKILLs itself at a crash point, or is killed at random.

The same command then resumes it; the result must equal an uninterrupted run, row for row and bit
for bit, and every visible shard must stay readable throughout.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from jobs import extract
from lib import sample
from lib.inspect.verify import verify
from tests.conftest import write_rows

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHARD_ROWS = 6
NULL_ROWS = {3, 29, 41}  # null texts: skipped, and no unit is made of them alone


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocesses: the same arithmetic in every run, and
    on a loaded 2-core machine several times faster than spinning OpenMP threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A corpus of its own: two files of uneven length with string ids, so units end mid-file."""
    root = tmp_path_factory.mktemp("resume")
    texts = sample.generate_texts(50, seed=77, mean_words=9)
    for row in NULL_ROWS:
        texts[row] = None
    ids = [f"doc-{i:02d}" for i in range(len(texts))]
    folder = root / "corpus"
    folder.mkdir()
    write_rows(folder / "a.parquet", texts[:23], ids=ids[:23])
    write_rows(folder / "b.parquet", texts[23:], ids=ids[23:])
    return {
        "root": root,
        "path": str(folder),
        "ids": ids,
        "skipped": {ids[row] for row in NULL_ROWS},
    }


def job_args(model: str, corpus: str, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"input.path={corpus}",
        f"output.dir={out}",
        "output.k=5",
        f"output.shard_rows={SHARD_ROWS}",
        "input.max_length=24",
        "batching.max_tokens=64",
        "runtime.threads=1",
        *extra,
    ]


def run(launcher, args: list[str], crash: str | None = None):
    """The job in a process of its own (a fork-server child, see tests/launcher.py); `crash`
    names the point where it SIGKILLs itself."""
    return launcher.start(args, {"LOGIT_EXTRACT_CRASH_AT": crash} if crash else {}).wait()


def shards(out: Path) -> list[Path]:
    return sorted(p for p in (out / "tokens").glob("part-*"))


def temporaries(out: Path) -> list[str]:
    """Temporary files left in `out`, named by the file they were to become."""
    found = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    return sorted(str(p.relative_to(out)).split("@")[0] for p in found)


def assert_visible_shards_readable(out: Path, fmt: str) -> int:
    """Every visible part-* file opens and reads in full; returns how many there are."""
    for path in shards(out):
        if fmt == "parquet":
            pq.read_table(path)
        else:
            pa.ipc.open_file(pa.memory_map(str(path))).read_all().validate(full=True)
    ds.dataset(out, format=fmt).to_table()  # the folder as a whole reads too
    return len(shards(out))


def read_output(out: Path, fmt: str) -> pa.Table:
    table = ds.dataset(out, format=fmt).to_table()
    return table.sort_by([("id", "ascending"), ("position", "ascending")]).combine_chunks()


def job_record_id(out: Path) -> int | None:
    """The inode of `_job.json`: each run replaces it when it starts working."""
    try:
        return (out / "_job.json").stat().st_ino
    except FileNotFoundError:
        return None


def stat_tree(out: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")
    }


@pytest.fixture(scope="module")
def baseline(inputs, model_dirs) -> dict:
    """The uninterrupted run (in-process; the code path is the same)."""
    out = inputs["root"] / "baseline"
    assert (
        extract.main(job_args(model_dirs["gpt2"], inputs["path"], out, "input.id_column=doc_id"))
        == 0
    )
    return {
        "out": out,
        "table": read_output(out, "parquet"),
        "manifest": json.loads((out / "_manifest.json").read_text()),
    }


def assert_same_as_baseline(out: Path, baseline: dict, inputs: dict) -> None:
    table = read_output(out, "parquet")
    assert table.num_rows == baseline["table"].num_rows
    assert table.equals(baseline["table"])  # every column, exactly
    ids = set(table.column("id").to_pylist())
    assert ids == set(inputs["ids"]) - inputs["skipped"]
    assert (
        set(pq.read_table(out / "_skipped/skipped.parquet").column("id").to_pylist())
        == inputs["skipped"]
    )
    keys = table.select(["id", "position"])
    assert (
        keys.group_by(["id", "position"]).aggregate([]).num_rows == keys.num_rows
    )  # no duplicates
    assert temporaries(out) == []
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["shards"] == baseline["manifest"]["shards"]
    assert manifest["totals"] == baseline["manifest"]["totals"]
    assert verify(out, check_input=True).problems == []


def test_kills_at_each_crash_point_then_resume(launcher, inputs, baseline, model_dirs, tmp_path):
    """Kill the same job at every crash point in turn, resuming each time, then let it finish."""
    out = tmp_path / "out"
    args = job_args(model_dirs["gpt2"], inputs["path"], out, "input.id_column=doc_id")
    units = len(baseline["manifest"]["shards"])
    assert units == 9  # 23 + 27 rows in units of 6: the kills below land mid-job

    # Inside a shard write: the third unit's rows are in its temporary file, which has no footer.
    killed = run(launcher, args, crash="shard_write:3")
    assert killed.code == -signal.SIGKILL, killed.stderr
    assert assert_visible_shards_readable(out, "parquet") == 2
    assert temporaries(out) == ["_tmp/part-00002.parquet"]
    with pytest.raises(pa.ArrowInvalid):
        pq.ParquetFile(next((out / "_tmp").iterdir()))
    kept = {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards(out)}

    # Between closing a temporary file and renaming it: complete, but neither visible nor recorded.
    killed = run(launcher, args, crash="before_rename:2")
    assert killed.code == -signal.SIGKILL, killed.stderr
    assert assert_visible_shards_readable(out, "parquet") == 3
    assert temporaries(out) == ["_tmp/part-00003.parquet"]
    assert not (out / "_units" / "part-00003.json").exists()

    # Between the unit's record and its rename: recorded but not visible, so not committed.
    killed = run(launcher, args, crash="between_record_and_shard:2")
    assert killed.code == -signal.SIGKILL, killed.stderr
    assert assert_visible_shards_readable(out, "parquet") == 4
    assert (out / "_units" / "part-00004.json").exists() and not (
        out / "tokens" / "part-00004.parquet"
    ).exists()

    # Before the success marker: every shard and the manifest are there, _SUCCESS is not.
    killed = run(launcher, args, crash="before_success")
    assert killed.code == -signal.SIGKILL, killed.stderr
    assert assert_visible_shards_readable(out, "parquet") == units
    assert (out / "_manifest.json").exists() and not (out / "_SUCCESS").exists()
    assert verify(out).problems == ["_SUCCESS is missing: the job has not finished"]

    finished = run(launcher, args)
    assert finished.code == 0, finished.stderr
    assert_same_as_baseline(out, baseline, inputs)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["throughput"]["units"] == 0  # the last run only wrote the manifest
    # Shards committed before the first kill were kept, not recomputed.
    assert {
        name: (p.stat().st_ino, p.stat().st_mtime_ns) for name in kept for p in [out / name]
    } == kept
    runs = {json.loads(p.read_text())["run_id"] for p in (out / "_units").iterdir()}
    assert len(runs) == 4  # units were committed by each of the four killed runs


def test_finished_job_rerun_rewrites_nothing(inputs, baseline, model_dirs, capsys):
    out = baseline["out"]
    before = stat_tree(out)
    folder_mtime = out.stat().st_mtime_ns
    assert (
        extract.main(job_args(model_dirs["gpt2"], inputs["path"], out, "input.id_column=doc_id"))
        == 0
    )
    assert f"already complete: {out} (nothing rewritten)" in capsys.readouterr().out
    assert stat_tree(out) == before
    assert out.stat().st_mtime_ns == folder_mtime


def test_changed_config_is_refused_unless_overwrite(inputs, baseline, model_dirs, tmp_path, capsys):
    out = Path(shutil.copytree(baseline["out"], tmp_path / "out"))
    before = stat_tree(out)
    changed = job_args(
        model_dirs["gpt2"], inputs["path"], out, "input.id_column=doc_id", "output.k=3"
    )
    assert extract.main(changed) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: output.dir {out} was started with other settings (output.k: 5, now 3); use a "
        "new directory, the same settings, or output.overwrite=true\n"
    )
    assert stat_tree(out) == before
    # Keys hashed only where they apply are named by their config names when their values
    # differ (min_k_fraction and top_p's min_k keep their defaults here, so they are not).
    assert extract.main([*changed[:-1], "output.top_p=0.9", "output.level=both"]) == 2
    assert capsys.readouterr().err == (
        f'error: output.dir {out} was started with other settings (output.level: "tokens", '
        'now "both"; output.top_p: 1.0, now 0.9); use a new directory, the same settings, '
        "or output.overwrite=true\n"
    )
    assert stat_tree(out) == before

    assert extract.main([*changed, "output.overwrite=true"]) == 0
    table = read_output(out, "parquet")
    assert table.schema.field("topk_ids").type.list_size == 3
    assert table.select(["id", "position"]).equals(baseline["table"].select(["id", "position"]))
    assert verify(out, check_input=True).problems == []


def test_random_kills_then_resume_full_logits_arrow(launcher, model_dirs, tmp_path):
    """Kill at a random batch, then at a random moment; visible shards always read.

    Full logits stream batch by batch into the shard, so a kill can also land mid-unit. No id
    column: ids are global row indices, which the resumed run must assign the same way.
    """
    texts = sample.generate_texts(120, seed=78, mean_words=9)
    for row in NULL_ROWS:
        texts[row] = None
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, start in enumerate(range(0, len(texts), 40)):
        write_rows(corpus / f"{i}.parquet", texts[start : start + 40])
    settings = [
        "output.logits=full",
        "output.format=arrow",
        "output.dtype=float32",
        "output.shard_rows=8",
    ]
    uninterrupted = tmp_path / "uninterrupted"
    assert extract.main(job_args(model_dirs["llama"], str(corpus), uninterrupted, *settings)) == 0
    expected = read_output(uninterrupted, "arrow")
    units = len(shards(uninterrupted))
    assert units == 15

    out = tmp_path / "out"
    args = job_args(model_dirs["llama"], str(corpus), out, *settings)
    rng = random.Random(20240611)
    # A kill at a random batch write (deterministic landing: timing on a loaded machine is not):
    # full logits stream into the shard, so its temporary file has rows but no footer yet.
    crash = f"shard_write:{rng.randint(2, 12)}"
    killed = run(launcher, args, crash=crash)
    assert killed.code == -signal.SIGKILL, (crash, killed.stderr)
    assert assert_visible_shards_readable(out, "arrow") < units
    # The unit being streamed, and the one before it if its commit (on a commit thread) had
    # not finished: the last has no footer yet. That commit may also be writing its record
    # (_tmp/part-NNNNN.json@...), which is not a shard.
    temps = sorted((out / "_tmp").iterdir())
    partial = [p for p in temps if ".arrow@" in p.name]
    assert 1 <= len(partial) <= 2, temps
    assert all(".json@" in p.name for p in temps if p not in partial), temps
    with pytest.raises(pa.ArrowInvalid):
        pa.ipc.open_file(partial[-1])
    # Then one at a random moment once the resumed run is working.
    previous = job_record_id(out)
    process = launcher.start(args)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and job_record_id(out) == previous:
        time.sleep(0.005)  # the run's own _job.json: torch is imported and the model loaded
    time.sleep(rng.uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait(60)
    assert_visible_shards_readable(out, "arrow")
    finished = run(launcher, args)
    assert finished.code == 0, finished.stderr
    result = read_output(out, "arrow")
    assert result.equals(expected)
    assert set(result.column("id").to_pylist()) == set(range(len(texts))) - NULL_ROWS
    assert temporaries(out) == []
    assert verify(out, check_input=True).problems == []


def test_four_commit_threads_killed_then_resumed(launcher, inputs, model_dirs, baseline, tmp_path):
    """With four commit threads (a bigger host's default) the commits of several units overlap,
    so the N-th visit of a kill point may be any unit's and the others may be at any stage.
    Killed at three points in turn, with commits slowed so that they pile up: every visible
    shard reads and has its record, and the resume equals the uninterrupted run."""
    out = tmp_path / "out"
    args = job_args(model_dirs["gpt2"], inputs["path"], out, "input.id_column=doc_id")
    # The commits do overlap: with each held before its rename (for good), a third unit reaches
    # that point while the first two wait there (one thread would wait there forever).
    held = {
        "LOGIT_EXTRACT_HOLD_AT": f"before_rename={tmp_path / 'never'}",
        "LOGIT_EXTRACT_CRASH_AT": "before_rename:3",
    }
    killed = launcher.start(args, {"LOGIT_EXTRACT_COMMIT_WORKERS": "4", **held}).wait()
    assert killed.code == -signal.SIGKILL, killed.stderr
    assert shards(out) == []
    assert len([p for p in (out / "_tmp").iterdir() if ".parquet@" in p.name]) >= 3
    env = {"LOGIT_EXTRACT_COMMIT_WORKERS": "4", "LOGIT_EXTRACT_PAUSE_AT": "fsync=0.02"}
    # The second visit: at most one unit is committed before it, so every run leaves work.
    for crash in ("before_rename:2", "between_record_and_shard:2", "shard_write:2"):
        killed = launcher.start(args, {**env, "LOGIT_EXTRACT_CRASH_AT": crash}).wait()
        assert killed.code == -signal.SIGKILL, (crash, killed.stderr)
        assert_visible_shards_readable(out, "parquet")
        for shard in shards(out):
            assert (out / "_units" / f"{shard.name.split('.')[0]}.json").exists(), crash
    launcher.start(args, env).wait().assert_ok()
    assert_same_as_baseline(out, baseline, inputs)


def test_level_both_killed_between_its_two_renames_then_resumed(
    launcher, inputs, model_dirs, tmp_path
):
    """A unit commits a token and a document shard. Killed after the third unit's token shard
    became visible but before its document shard did, the unit counts as not done: the resume
    recomputes it, and the result equals an uninterrupted run at the same level."""
    args = job_args(
        model_dirs["gpt2"],
        inputs["path"],
        tmp_path / "out",
        "input.id_column=doc_id",
        "output.level=both",
    )
    clean = tmp_path / "clean"
    assert run(launcher, [*args[:2], f"output.dir={clean}", *args[3:]]).code == 0
    out = tmp_path / "out"
    # Renames: _job.json, then a record, a token and a document shard per unit: the 10th is
    # the third unit's document shard.
    killed = run(launcher, args, crash="rename:10")
    assert killed.code == -signal.SIGKILL, killed.stderr
    names = {
        folder: {p.name for p in (out / folder).iterdir()} for folder in ("tokens", "documents")
    }
    assert names["tokens"] - names["documents"] == {"part-00002.parquet"}
    finished = run(launcher, args)
    assert finished.code == 0, finished.stderr
    for folder in ("tokens", "documents"):
        keys = [("id", "ascending")] + ([("position", "ascending")] if folder == "tokens" else [])
        got, want = (ds.dataset(o / folder).to_table().sort_by(keys) for o in (out, clean))
        assert got.equals(want), folder
    manifest, reference = (json.loads((o / "_manifest.json").read_text()) for o in (out, clean))
    assert manifest["scores"] == reference["scores"]
    assert [(s["file"], s["sha256"]) for s in manifest["shards"]] == [
        (s["file"], s["sha256"]) for s in reference["shards"]
    ]
    assert verify(out, check_input=True).problems == []


def test_compact_top_p_killed_then_resumed(launcher, inputs, model_dirs, tmp_path):
    """Compact rows with top_p: a kill between a shard's close and its rename, then a resume,
    give exactly the uninterrupted run's shards (the same id order in every footer)."""
    settings = ["input.id_column=doc_id", "output.encoding=compact", "output.top_p=0.8"]
    reference = tmp_path / "reference"
    assert extract.main(job_args(model_dirs["gpt2"], inputs["path"], reference, *settings)) == 0
    out = tmp_path / "out"
    args = job_args(model_dirs["gpt2"], inputs["path"], out, *settings)
    killed = run(launcher, args, crash="before_rename:2")
    assert killed.code == -signal.SIGKILL, killed.stderr
    assert temporaries(out) == ["_tmp/part-00001.parquet"]  # the second unit
    finished = run(launcher, args)
    assert finished.code == 0, finished.stderr
    assert read_output(out, "parquet").equals(read_output(reference, "parquet"))
    for shard in shards(reference):
        assert (out / "tokens" / shard.name).read_bytes() == shard.read_bytes()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["totals"] == json.loads((reference / "_manifest.json").read_text())["totals"]
    assert verify(out, check_input=True).problems == []


def test_top_p_and_encoding_enter_the_fingerprint_only_when_set():
    from lib.config import load_config
    from lib.output.resume import fingerprint

    base = ["model.path=m", "input.path=i", "output.dir=o"]
    model = {"identity": {}, "files": []}

    def print_of(*extra: str) -> str:
        return fingerprint(load_config(None, [*base, *extra]), [], model)

    default = print_of()
    assert print_of("output.encoding=plain", "output.top_p=1.0", "output.min_k=3") == default
    changed = {print_of("output.encoding=compact"), print_of("output.top_p=0.9")}
    changed |= {print_of("output.top_p=0.9", "output.min_k=2"), default}
    assert len(changed) == 4
