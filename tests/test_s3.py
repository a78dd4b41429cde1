"""Input from and output to s3:// on a local S3-compatible server (moto, authenticated): the same
rows as on a local disk, exact resume after SIGKILL, two processes with no shared disk, and one
line for a missing bucket or bad credentials."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from jobs import extract
from lib import results, storage
from lib.inspect import run_stats
from lib.inspect.verify import verify
from tests.launcher import rank_environments

ROOT = Path(__file__).resolve().parents[1]


def settings(model: str, corpus: str, out: str) -> list[str]:
    return [
        f"model.path={model}",
        f"input.path={corpus}",
        "input.id_column=doc_id",
        "input.max_length=24",
        "output.k=5",
        "output.shard_rows=9",
        "output.level=both",
        "model.dtype=float32",
        "runtime.threads=1",
        f"output.dir={out}",
    ]


def _rows(out: str, folder: str = "tokens") -> pa.Table:
    path = storage.location(out) / folder
    files, filesystem = storage.dataset_files(sorted(path.glob("part-*")))
    table = ds.dataset(files, format="parquet", filesystem=filesystem).to_table()
    keys = [("id", "ascending")] + ([("position", "ascending")] if folder == "tokens" else [])
    return table.sort_by(keys).combine_chunks()


@pytest.fixture(scope="module")
def job(s3_server, model_dirs, corpus, tmp_path_factory) -> dict:
    return bucket_and_local_run(s3_server, model_dirs, corpus, tmp_path_factory)


def bucket_and_local_run(s3_server, model_dirs, corpus, tmp_path_factory) -> dict:
    """A bucket holding the corpus, and the job's rows computed on local disk."""
    bucket = f"job-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    for path in sorted(Path(corpus).glob("*.parquet")):
        s3_server.client().upload_file(str(path), bucket, f"corpus/{path.name}")
    local = tmp_path_factory.mktemp("s3-reference") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert extract.main(settings(model_dirs["gpt2"], corpus, str(local))) == 0
    finally:
        torch.set_num_threads(threads)
    return {"bucket": bucket, "corpus": f"s3://{bucket}/corpus", "local": str(local)}


def same_as_local(out: str, local: str) -> None:
    assert _rows(out).equals(_rows(local))
    assert _rows(out, "documents").equals(_rows(local, "documents"))
    manifest = json.loads((storage.location(out) / "_manifest.json").read_text())
    reference = json.loads((Path(local) / "_manifest.json").read_text())
    assert manifest["totals"] == reference["totals"] and manifest["scores"] == reference["scores"]
    assert [(s["file"], s["rows"], s["sha256"]) for s in manifest["shards"]] == [
        (s["file"], s["rows"], s["sha256"]) for s in reference["shards"]
    ]  # byte for byte the local shards
    skipped = pq.read_table(storage.open_input(storage.location(out) / "_skipped/skipped.parquet"))
    assert skipped.equals(pq.read_table(Path(local) / "_skipped/skipped.parquet"))
    assert verify(out, check_input=True).problems == []


def _objects(s3, bucket: str, prefix: str) -> dict[str, tuple]:
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"]: (item["ETag"], item["LastModified"]) for item in listing}


def test_s3_input_and_output_equal_local_disk(s3, job, model_dirs):
    out = f"s3://{job['bucket']}/in-process"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert extract.main(settings(model_dirs["gpt2"], job["corpus"], out)) == 0
        same_as_local(out, job["local"])
        assert not _objects(s3, job["bucket"], "in-process/_tmp")  # no temporaries on S3
        assert not _objects(s3, job["bucket"], "in-process/_lock.json")  # released
        before = _objects(s3, job["bucket"], "in-process/")
        assert extract.main(settings(model_dirs["gpt2"], job["corpus"], out)) == 0
        assert _objects(s3, job["bucket"], "in-process/") == before  # a rerun writes nothing
    finally:
        torch.set_num_threads(threads)
    # The readers and the report's aggregation read s3:// output as they read a directory.
    frame = results.load_frame(out)
    assert len(frame) == _rows(job["local"]).num_rows
    info = run_stats.read_run(out)
    assert not info.partial and len(info.records) == 8
    assert run_stats.scan_tokens(info) is not None


def test_s3_failed_then_killed_job_resumes_exactly(s3, job, model_dirs, launcher):
    """An I/O error mid-unit, then a SIGKILL mid-commit, then the same command: only whole
    shards are ever visible, no upload is left behind, and the result is the local run's."""
    out = f"s3://{job['bucket']}/faults"
    args = settings(model_dirs["gpt2"], job["corpus"], out)
    folder = storage.location(out)
    # The second unit's token shard fails as it closes: one line, exit 1, its upload discarded.
    failed = launcher.start(args, {**s3.env, "LOGIT_EXTRACT_FAIL_AT": "shard_close:3"}).wait()
    failed.assert_one_error(1, "cannot write s3://", "No space left on device")
    assert [p.name for p in (folder / "tokens").glob("part-*")] == ["part-00000.parquet"]
    assert [p.name for p in (folder / "_units").glob("part-*")] == ["part-00000.json"]
    assert s3.client().list_multipart_uploads(Bucket=job["bucket"]).get("Uploads", []) == []
    # Publishes ("rename") of the next run: _job.json, then per unit its record, token and
    # document shards, and the record again with their ETags; the 7th is unit 2's token
    # shard: its record is up, its shards are not.
    killed = launcher.start(args, {**s3.env, "LOGIT_EXTRACT_CRASH_AT": "rename:7"}).wait()
    assert killed.code == -signal.SIGKILL, killed.tail()
    visible = [p.name for p in (folder / "tokens").glob("part-*")]
    assert visible == ["part-00000.parquet", "part-00001.parquet"]
    for name in visible:
        pq.read_table(storage.open_input(folder / "tokens" / name))  # whole and readable
    assert (folder / "_units" / "part-00002.json").exists()
    launcher.start(args, s3.env).wait().assert_ok()
    same_as_local(out, job["local"])


def test_s3_missing_bucket_and_bad_credentials_end_in_one_line(s3, job, model_dirs, launcher):
    model, corpus = model_dirs["gpt2"], job["corpus"]
    runs = [
        launcher.start(settings(model, corpus, "s3://no-such-bucket-here/out"), s3.env),
        launcher.start(settings(model, "s3://no-such-bucket-here/corpus", "/tmp/x"), s3.env),
        launcher.start(
            settings(model, corpus, f"s3://{job['bucket']}/bad-keys"),
            {**s3.env, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0"},
        ),
    ]
    missing_out, missing_in, bad_keys = (run.wait() for run in runs)
    missing_out.assert_one_error(1, "s3://no-such-bucket-here/out", "the bucket does not exist")
    missing_in.assert_one_error(2, "s3://no-such-bucket-here/corpus", "the bucket does not exist")
    bad_keys.assert_one_error(
        2, f"s3://{job['bucket']}/corpus", "access denied", "AWS_ACCESS_KEY_ID"
    )


@pytest.mark.slow
def test_s3_two_processes_share_no_disk(s3, job, model_dirs, tmp_path, launcher):
    """Two ranks as `accelerate launch` starts them (its variables; tests/test_distributed.py
    runs the real command), in an empty folder: nothing local is shared but the model."""
    out = f"s3://{job['bucket']}/two-processes"
    args = settings(model_dirs["gpt2"], job["corpus"], out)
    ranks = [
        launcher.start(args, {**s3.env, **rank}, cwd=tmp_path) for rank in rank_environments(2)
    ]
    for run in ranks:
        run.wait().assert_ok()
    same_as_local(out, job["local"])
    manifest = json.loads((storage.location(out) / "_manifest.json").read_text())
    assert manifest["world_size"] == 2 and {s["rank"] for s in manifest["shards"]} == {0, 1}
    assert list(tmp_path.iterdir()) == []  # nothing written locally


def test_object_stores_list_without_pyarrow_creating_anything(s3, job):
    """find_input_files on s3:// globs and folders, as on a local disk."""
    from lib.extract.corpus import find_input_files

    names = [f"s3://{job['bucket']}/corpus/{n}" for n in ("a.parquet", "b.parquet")]
    assert find_input_files(job["corpus"]) == names
    assert find_input_files(f"s3://{job['bucket']}/corpus/*.parquet") == names
    assert find_input_files(f"s3://{job['bucket']}/corpus/b.parquet") == names[1:]
    fs, _ = pafs.FileSystem.from_uri(job["corpus"])
    assert fs.get_file_info(f"{job['bucket']}/corpus/_tmp").type == pafs.FileType.NotFound


def test_other_stores_through_fsspec_give_the_same_rows(model_dirs, corpus, tmp_path):
    """The generic path (a temporary moved into place, a checked lease) on fsspec's memory://,
    with compact top-p shards (their id order is written to the footer after the rows)."""
    out = f"memory://generic-{uuid.uuid4().hex[:8]}/out"
    compact = ["output.encoding=compact", "output.top_p=0.9", "output.min_k=2"]
    local = str(tmp_path / "local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert extract.main([*settings(model_dirs["gpt2"], corpus, local), *compact]) == 0
        assert extract.main([*settings(model_dirs["gpt2"], corpus, out), *compact]) == 0
    finally:
        torch.set_num_threads(threads)
    same_as_local(out, local)
    assert list((storage.location(out) / "_tmp").iterdir()) == []
    remote, here = results.load_arrays(out), results.load_arrays(local)
    assert remote.keys() == here.keys() and "topk_ids" in remote
    for name in remote:
        np.testing.assert_array_equal(remote[name], here[name], err_msg=name)
