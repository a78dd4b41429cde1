"""lib/storage.py against a local S3-compatible server (moto) and fsspec's in-memory store."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib import storage
from lib.errors import UserError
from lib.storage import s3 as lib_s3


@pytest.fixture
def bucket(s3) -> str:
    name = f"unit-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def _uploads(s3, bucket: str) -> list:
    return s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_location_keeps_local_paths_and_parses_uris(tmp_path):
    assert storage.location(str(tmp_path)) == tmp_path
    assert storage.location("file://" + str(tmp_path)) == tmp_path
    assert storage.location("~/x") == Path.home() / "x"
    assert not storage.is_uri("/data/x") and not storage.is_uri("file:///data/x")
    assert storage.is_uri("s3://b/x") and storage.is_uri("gs://b/x")
    with pytest.raises(UserError, match="no bucket"):
        storage.location("s3://")


def test_object_paths_list_read_and_delete(s3, bucket):
    client = s3.client()
    for key in ("out/tokens/part-00000.parquet", "out/tokens/part-00001.parquet", "out/_job.json"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    out = storage.location(f"s3://{bucket}/out/")
    assert str(out) == f"s3://{bucket}/out" and out.name == "out"
    assert out.is_dir() and not out.is_file() and (out / "_job.json").is_file()
    assert not (out / "missing").exists()
    shards = sorted((out / "tokens").glob("part-*"))
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet"]
    assert shards[0].suffix == ".parquet" and shards[0].parent == out / "tokens"
    assert shards[0].relative_to(out).as_posix() == "tokens/part-00000.parquet"
    assert sorted(p.name for p in out.iterdir()) == ["_job.json", "tokens"]
    assert len(out.files()) == 3
    assert (out / "_job.json").read_text() == "out/_job.json"
    assert (out / "_job.json").stat().st_size == len("out/_job.json")
    (out / "_job.json").unlink()
    (out / "_job.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (out / "_job.json").unlink()
    storage.remove(out / "tokens")
    assert out.files() == []


def test_sink_appears_whole_only_when_published(s3, bucket, monkeypatch):
    monkeypatch.setattr(lib_s3, "PART_BYTES", 4096)  # a multipart upload of several parts
    final = storage.location(f"s3://{bucket}/out/tokens/part-00000.parquet")
    table = pa.table({"x": pa.array(range(20_000), pa.int64())})
    sink = storage.Sink(final, final.parent.parent / "_tmp" / "unused")
    pq.write_table(table, sink.file, compression="none")
    digest, size = sink.close()
    assert size > 4 * 4096 and len(_uploads(s3, bucket)) == 1  # parts sent, nothing visible
    assert not final.exists()
    sink.publish()
    data = final.read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (digest, size)
    assert pq.read_table(storage.open_input(final)).equals(table)
    assert _uploads(s3, bucket) == [] and not (final.parent.parent / "_tmp").exists()

    aborted = storage.Sink(final.with_name("part-00001.parquet"), final)
    pq.write_table(table, aborted.file, compression="none")
    aborted.abort()  # as a failed unit does: the parts are discarded, no object appears
    assert _uploads(s3, bucket) == [] and not final.with_name("part-00001.parquet").exists()

    small = storage.Sink(final.with_name("part-00002.parquet"), final)
    small.file.write(b"tiny")
    assert small.close() == (hashlib.sha256(b"tiny").hexdigest(), 4)
    small.publish()  # one PUT
    assert final.with_name("part-00002.parquet").read_bytes() == b"tiny"


def test_a_killed_writers_upload_is_aborted_by_the_next_run(s3, bucket, monkeypatch):
    from lib.output import layout

    monkeypatch.setattr(lib_s3, "PART_BYTES", 1024)
    out = storage.location(f"s3://{bucket}/out")
    left = storage.Sink(out / "tokens" / "part-00000.parquet", out / "_tmp" / "x")
    left.file.write(b"x" * 5000)  # parts sent, then the writer is gone (as after SIGKILL)
    assert len(_uploads(s3, bucket)) == 1
    assert layout.remove_dead_temporaries(out) == 1
    assert _uploads(s3, bucket) == []


def test_create_exclusive_is_a_conditional_write_on_s3(s3, bucket):
    lock = storage.location(f"s3://{bucket}/out/_lock.json")
    assert storage.create_exclusive(lock, b"first")
    assert not storage.create_exclusive(lock, b"second")
    assert lock.read_bytes() == b"first"
    storage.put_atomic(lock, b"third", lock)
    assert lock.read_bytes() == b"third"


def test_other_stores_go_through_fsspec_with_a_temporary_moved_into_place():
    root = storage.location(f"memory://test-{uuid.uuid4().hex[:8]}/out")
    final, temp = root / "tokens" / "part-00000.arrow", root / "_tmp" / "part-00000.arrow@x.tmp"
    sink = storage.Sink(final, temp)
    sink.file.write(b"rows")
    assert sink.close() == (hashlib.sha256(b"rows").hexdigest(), 4)
    assert temp.exists() and not final.exists()
    sink.publish()
    assert final.read_bytes() == b"rows" and not temp.exists()
    failed = storage.Sink(final.with_name("part-00001.arrow"), temp)
    failed.file.write(b"half")
    failed.abort()
    assert not temp.exists() and not final.with_name("part-00001.arrow").exists()
    assert storage.create_exclusive(root / "_lock.json", b"a")
    assert not storage.create_exclusive(root / "_lock.json", b"b")


def test_store_errors_say_what_is_wrong_in_one_line(s3, bucket, monkeypatch):
    with pytest.raises(storage.StorageError, match="^the bucket does not exist$"):
        storage.location("s3://no-such-bucket-here/out").iterdir()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    storage.filesystem.cache_clear()
    lib_s3.forget_clients()
    with pytest.raises(storage.StorageError, match="access key is not valid"):
        storage.location(f"s3://{bucket}/out").iterdir()
    with pytest.raises(storage.StorageError, match="access key is not valid"):
        storage.create_exclusive(storage.location(f"s3://{bucket}/out/_lock.json"), b"x")


def test_glob_regex_matches_like_glob():
    regex = storage.glob_regex("s3://b/corpus/**/*.parquet")
    assert regex.match("s3://b/corpus/a.parquet") and regex.match("s3://b/corpus/x/y/a.parquet")
    assert not regex.match("s3://b/corpus/a.json") and not regex.match("s3://b/other/a.parquet")
    assert storage.glob_regex("/d/part-[0-9]?.parquet").match("/d/part-07.parquet")


def test_the_lease_holds_on_s3_and_a_dead_holders_is_taken_over(s3, bucket):
    import json
    import os
    import subprocess
    import sys

    from lib.output import lease

    out = storage.location(f"s3://{bucket}/out")
    path = out / "_lock.json"
    first = lease.Lease(path, "a")
    first.acquire(out)
    with pytest.raises(UserError, match=rf"is in use by another job \(pid {os.getpid()} on "):
        lease.Lease(path, "b").acquire(out)
    first.check()
    first.release()
    assert not path.exists()
    # A holder on this machine whose process is gone (a killed job) is replaced at once, and
    # the lease it held is lost for it.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    me = lease.Process.current()
    dead = {"host": me.host, "boot": me.boot, "pid": int(gone.stdout), "start": 1, "token": "t0"}
    storage.put_atomic(path, json.dumps({**dead, "started": 0}).encode(), path)
    successor = lease.Lease(path, "c")
    successor.acquire(out)
    assert lease.read_holder(path).token == "c"
    stale = lease.Lease(path, "t0")
    with pytest.raises(UserError, match="lost its lease"):
        stale.check()
    successor.release()


def test_s3_lease_writes_are_compare_and_swap(s3, bucket, monkeypatch):
    import time

    from lib.output import lease

    out = storage.location(f"s3://{bucket}/out")
    path = out / "_lock.json"
    first = lib_s3.create_tagged(path, b"one")
    assert first and lib_s3.create_tagged(path, b"two") is None
    second = lib_s3.replace_tagged(path, b"three", first)
    assert second and lib_s3.replace_tagged(path, b"four", first) is None  # a stale version
    assert path.read_bytes() == b"three"
    assert lib_s3.replace_tagged(out / "missing.json", b"x", second) is None
    path.unlink()
    # A holder whose lease another job replaced (a stall long enough to look dead) learns it at
    # its next renewal instead of writing over the successor's lease.
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    holder = lease.Lease(path, "a")
    holder.acquire(out)
    s3.client().put_object(Bucket=bucket, Key="out/_lock.json", Body=b'{"token": "b"}')
    deadline = time.monotonic() + 10
    while holder.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder.lost == "another job took it over"
    assert path.read_bytes() == b'{"token": "b"}'
    with pytest.raises(UserError, match="lost its lease"):
        holder.check()
    holder.release()  # stops renewing; the successor's lease stays
    assert path.read_bytes() == b'{"token": "b"}'
