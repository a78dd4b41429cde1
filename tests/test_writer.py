"""ShardWriter's atomic commit and resume.prepare_output's decisions about an output directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from lib import resume, writer
from lib.config import load_config
from lib.errors import UserError

K = 3
ROOT = Path(__file__).resolve().parents[1]


def _schema(full: bool = False) -> pa.Schema:
    return writer.output_schema(pa.string(), K, 11, "float16", full)


def _table(schema: pa.Schema, ids: list[str], rows: int = 4) -> pa.Table:
    """Rows with a null token at the last position, as a causal model's last position has."""
    rng = np.random.default_rng(0)
    row = np.arange(rows) % len(ids)
    stats = {
        "has_token": np.arange(rows) < rows - 1,
        "token_logprob": rng.normal(size=rows).astype(np.float32),
        "token_rank": np.arange(rows, dtype=np.int32),
        "logsumexp": rng.normal(size=rows).astype(np.float32),
        "topk_ids": rng.integers(0, 11, size=(rows, K)).astype(np.int32),
        "topk_logits": rng.normal(size=(rows, K)).astype(np.float16),
    }
    return writer.to_table(
        schema,
        pa.array(ids),
        row,
        np.arange(rows, dtype=np.int32),
        np.arange(rows, dtype=np.int64) + 5,
        stats,
    )


@pytest.fixture
def out_dir(tmp_path):
    (tmp_path / writer.UNITS_DIR).mkdir()
    return tmp_path


def _visible(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not p.name.startswith((".", "_")))


def test_to_table_builds_the_schema_with_nulls_where_no_token(out_dir):
    schema = _schema()
    table = _table(schema, ["a", "b"])
    assert table.schema == schema
    assert table.column("id").to_pylist() == ["a", "b", "a", "b"]
    assert table.column("token_id").to_pylist() == [5, 6, 7, None]
    assert table.column("token_rank").null_count == 1
    assert table.column("topk_ids").type == pa.list_(pa.int32(), K)


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_commit_makes_the_shard_visible_only_after_close(out_dir, fmt):
    schema = _schema()
    shard = writer.ShardWriter(out_dir, "part-00007", schema, fmt)
    first, second = _table(schema, ["a", "b"]), _table(schema, ["c"], rows=3)
    shard.write(first)
    shard.write(second)
    shard.write(first.slice(0, 0))  # empty tables are skipped
    assert _visible(out_dir) == []
    assert shard.tmp.name == f".part-00007.{fmt}.tmp" and shard.tmp.exists()
    assert not (out_dir / writer.UNITS_DIR / "part-00007.json").exists()

    shard.commit({"rank": 3})
    assert _visible(out_dir) == [f"part-00007.{fmt}"]
    assert not shard.tmp.exists()
    record = json.loads((out_dir / writer.UNITS_DIR / "part-00007.json").read_text())
    assert record == {"file": f"part-00007.{fmt}", "rows": 7, "rank": 3}
    expected = pa.concat_tables([first, second])
    if fmt == "parquet":
        read = pq.read_table(out_dir / "part-00007.parquet")
    else:
        read = ds.dataset(out_dir, format="arrow").to_table()  # skips _units and hidden files
    assert read.schema.names == schema.names
    assert read.cast(schema).equals(expected)


def test_full_logits_round_trip(out_dir):
    schema = _schema(full=True)
    rows = 3
    stats = {
        "has_token": np.ones(rows, bool),
        "token_logprob": np.zeros(rows, np.float32),
        "token_rank": np.zeros(rows, np.int32),
        "logsumexp": np.ones(rows, np.float32),
        "logits": np.arange(rows * 11, dtype=np.float16).reshape(rows, 11),
    }
    table = writer.to_table(
        schema,
        pa.array(["x"]),
        np.zeros(rows, np.int64),
        np.arange(rows, dtype=np.int32),
        np.arange(rows),
        stats,
    )
    shard = writer.ShardWriter(out_dir, "part-00000", schema, "arrow")
    shard.write(table)
    shard.commit({})
    read = ds.dataset(out_dir, format="arrow").to_table()
    assert read.column("logits").to_pylist()[2] == list(range(22, 33))


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_abort_leaves_nothing(out_dir, fmt):
    schema = _schema()
    shard = writer.ShardWriter(out_dir, "part-00001", schema, fmt)
    shard.write(_table(schema, ["a"]))
    shard.abort()
    assert sorted(p.name for p in out_dir.iterdir()) == [writer.UNITS_DIR]
    assert list((out_dir / writer.UNITS_DIR).iterdir()) == []


def test_failed_commit_discards_the_temporary_file(out_dir, monkeypatch):
    schema = _schema()
    shard = writer.ShardWriter(out_dir, "part-00002", schema, "parquet")
    shard.write(_table(schema, ["a"]))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_atomic", disk_full)
    with pytest.raises(OSError):
        shard.commit({})
    assert sorted(p.name for p in out_dir.iterdir()) == [writer.UNITS_DIR]


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "_manifest.json"
    writer.write_atomic(target, b"one")
    writer.write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["_manifest.json"]


# -- resume.prepare_output ---------------------------------------------------------------------


def _config(out_dir, *overrides):
    return load_config(None, ["model.path=m", "input.path=i", f"output.dir={out_dir}", *overrides])


def _finish(out_dir, fp):
    """Lay out a finished job: record, shard and unit record, manifest, _SUCCESS."""
    record = resume.prepare_output(out_dir, fp, _config(out_dir))
    (out_dir / "part-00000.parquet").write_bytes(b"shard")
    (out_dir / writer.UNITS_DIR / "part-00000.json").write_text("{}")
    (out_dir / writer.MANIFEST).write_text("{}")
    (out_dir / writer.SKIPPED).write_bytes(b"")
    (out_dir / writer.SUCCESS).write_bytes(b"")
    return record


def test_prepare_fresh_directory(tmp_path):
    out = tmp_path / "new" / "out"
    record = resume.prepare_output(out, "fp1", _config(out))
    assert record["complete"] is False and record["fingerprint"] == "fp1"
    assert sorted(p.name for p in out.iterdir()) == [writer.JOB, writer.UNITS_DIR]
    assert json.loads((out / writer.JOB).read_text())["run_id"] == record["run_id"]


def test_prepare_refuses_foreign_files_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds other files"):
        resume.prepare_output(tmp_path, "fp1", _config(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    resume.prepare_output(tmp_path, "fp1", _config(tmp_path, "output.overwrite=true"))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / writer.JOB).exists()


def test_prepare_refuses_a_different_job(tmp_path):
    _finish(tmp_path, "fp1")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="different job.*output.overwrite=true"):
        resume.prepare_output(tmp_path, "fp2", _config(tmp_path))
    assert (tmp_path / "part-00000.parquet").exists()

    record = resume.prepare_output(tmp_path, "fp2", _config(tmp_path, "output.overwrite=true"))
    assert record["fingerprint"] == "fp2" and record["complete"] is False
    # Only our files are cleared; the user's file stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == [writer.JOB, writer.UNITS_DIR, "notes.txt"]
    assert list((tmp_path / writer.UNITS_DIR).iterdir()) == []


def test_prepare_refuses_another_jobs_files_without_a_record(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(UserError, match="another job's output"):
        resume.prepare_output(tmp_path, "fp1", _config(tmp_path))


def test_prepare_complete_job_touches_nothing(tmp_path):
    first = _finish(tmp_path, "fp1")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    folder_mtime = tmp_path.stat().st_mtime_ns  # not even a write probe is created and removed
    record = resume.prepare_output(tmp_path, "fp1", _config(tmp_path))
    assert record["complete"] is True and record["run_id"] == first["run_id"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before
    assert tmp_path.stat().st_mtime_ns == folder_mtime


def test_prepare_resume_keeps_shards_and_removes_temporaries(tmp_path):
    first = resume.prepare_output(tmp_path, "fp1", _config(tmp_path))
    (tmp_path / "part-00000.parquet").write_bytes(b"shard")
    (tmp_path / writer.UNITS_DIR / "part-00000.json").write_text("{}")
    (tmp_path / ".part-00001.parquet.tmp").write_bytes(b"partial")
    (tmp_path / writer.UNITS_DIR / ".part-00001.json.tmp").write_text("{")
    record = resume.prepare_output(tmp_path, "fp1", _config(tmp_path))
    assert record["complete"] is False and record["run_id"] != first["run_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        writer.JOB,
        writer.UNITS_DIR,
        "part-00000.parquet",
    ]
    assert [p.name for p in (tmp_path / writer.UNITS_DIR).iterdir()] == ["part-00000.json"]


def test_prepare_unwritable_directory_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")  # permissions do not stop root; a file in the path does
    out = tmp_path / "file" / "out"
    with pytest.raises(UserError, match=f"output.dir {out}: cannot write there"):
        resume.prepare_output(out, "fp1", _config(out))


def test_crash_point_kills_at_the_nth_time():
    code = (
        "from lib import writer\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    writer.crash_point('before_rename')  # another point never fires\n"
        "    writer.crash_point('shard_write')\n"
    )
    env = {**os.environ, "LOGIT_EXTRACT_CRASH_AT": "shard_write:3"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["0", "1", "2"]
