"""Operator faults on an object store (the local S3 server): an input object replaced while the
job runs, a shard overwritten after success, a foreign object in a data folder, an output.dir
that names an object, and `jobs.report` without a usable endpoint or credentials. Each ends in
one line with nothing wrong in the bucket, or in the local disk's rows."""

from __future__ import annotations

import json
import re

import pytest

from lib import storage
from tests.launcher import Run
from tests.test_s3 import bucket_and_local_run, same_as_local, settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(s3_server, model_dirs, corpus, tmp_path_factory) -> dict:
    return bucket_and_local_run(s3_server, model_dirs, corpus, tmp_path_factory)


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(item["Key"] for item in listing)


def _wait_for_a_shard(s3, job, run: Run, prefix: str) -> None:
    import time

    deadline = time.monotonic() + 600
    while not _keys(s3, job["bucket"], prefix):
        assert run.poll() is None, run.tail()
        assert time.monotonic() < deadline, run.tail()
        time.sleep(0.01)


def test_s3_input_replaced_mid_run_fails_then_finishes_once_restored(
    s3, job, model_dirs, launcher, tmp_path
):
    """An input object replaced once the first shard is up: every later read asks for the ETag
    the job fingerprinted, so none reads the new object; one line, exit 2, no _SUCCESS. Once
    the object is restored the same command ends equal to the local run."""
    bucket, client = job["bucket"], s3.client()
    client.copy_object(
        Bucket=bucket, Key="moving/a.parquet", CopySource=f"{bucket}/corpus/a.parquet"
    )
    client.copy_object(
        Bucket=bucket, Key="moving/b.parquet", CopySource=f"{bucket}/corpus/b.parquet"
    )
    original = client.get_object(Bucket=bucket, Key="moving/b.parquet")["Body"].read()
    out = f"s3://{bucket}/replaced"
    args = settings(model_dirs["gpt2"], f"s3://{bucket}/moving", out)
    go = tmp_path / "go"  # the writer waits at unit 1's token shard (unit 0 wrote two) until go
    run = launcher.start(args, {**s3.env, "LOGIT_EXTRACT_HOLD_AT": f"shard_write:3={go}"})
    _wait_for_a_shard(s3, job, run, "replaced/tokens/")
    edited = bytearray(original)
    at = len(edited) // 3
    edited[at : at + 4] = b"qqqq"  # the same size: only the ETag tells
    client.put_object(Bucket=bucket, Key="moving/b.parquet", Body=bytes(edited))
    go.touch()
    run.wait().assert_one_error(
        2, f"input file s3://{bucket}/moving/b.parquet changed while the job ran"
    )
    assert not _keys(s3, bucket, "replaced/_SUCCESS")
    client.put_object(Bucket=bucket, Key="moving/b.parquet", Body=original)
    launcher.start(args, s3.env).wait().assert_ok()
    same_as_local(out, job["local"])


def _flip(client, bucket: str, key: str) -> None:
    """Overwrite an object with bytes of the same size, 10 of them flipped."""
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    middle = len(body) // 2
    body[middle : middle + 10] = bytes(b ^ 0xFF for b in body[middle : middle + 10])
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))


def test_s3_shard_overwritten_is_recomputed(s3, job, model_dirs, launcher, tmp_path):
    """A shard overwritten with bytes of the same size (10 flipped) while the job runs: the
    listing's ETag differs from the one recorded, so no _SUCCESS, one line naming it; the same
    command recomputes it. Then, in the finished output, a shard overwritten so: the rerun finds
    it as a local rerun would, by the ETag the job recorded, and recomputes exactly it; then the
    same for a shard whose record has no ETag (as a record of an upload killed between
    publishing and recording), found by hashing every byte."""
    bucket, client = job["bucket"], s3.client()
    out = f"s3://{bucket}/overwritten"
    args = settings(model_dirs["gpt2"], job["corpus"], out)
    go = tmp_path / "go"
    run = launcher.start(args, {**s3.env, "LOGIT_EXTRACT_HOLD_AT": f"shard_write:3={go}"})
    _wait_for_a_shard(s3, job, run, "overwritten/tokens/")  # its record was written before
    _flip(client, bucket, "overwritten/tokens/part-00000.parquet")
    go.touch()
    run.wait().assert_one_error(
        2, f"output.dir {out}: shard tokens/part-00000.parquet changed after it was committed"
    )
    assert not _keys(s3, bucket, "overwritten/_SUCCESS")
    launcher.start(args, s3.env).wait().assert_ok()
    same_as_local(out, job["local"])
    for unit, keep_etag in (("part-00001", True), ("part-00003", False)):
        if not keep_etag:
            path = f"overwritten/_units/{unit}.json"
            data = json.loads(client.get_object(Bucket=bucket, Key=path)["Body"].read())
            assert all("etag" in entry for entry in data["files"])
            for entry in data["files"]:
                del entry["etag"]
            client.put_object(Bucket=bucket, Key=path, Body=json.dumps(data).encode())
        _flip(client, bucket, f"overwritten/tokens/{unit}.parquet")
        rerun = launcher.start(args, s3.env).wait()
        rerun.assert_ok()
        shards = f"tokens/{unit}.parquet, documents/{unit}.parquet"  # the unit's two shards
        assert re.search(rf"recomputed\s+2 shards .*: {shards}\n", rerun.stdout), rerun.stdout
        assert f"shard tokens/{unit}.parquet failed its checksum; recomputing" in rerun.stderr
        same_as_local(out, job["local"])


@pytest.fixture(scope="module")
def finished(s3_server, job, model_dirs, launcher) -> tuple[str, list[str]]:
    """One finished S3 output for the tests that leave it as they found it."""
    out = f"s3://{job['bucket']}/finished"
    args = settings(model_dirs["gpt2"], job["corpus"], out)
    launcher.start(args, s3_server.env).wait().assert_ok()
    return out, args


def test_s3_foreign_object_is_refused_never_deleted(s3, job, finished, launcher):
    """An object the job did not write under OUT/tokens/: the rerun refuses in one line naming
    it, and the object stays."""
    out, args = finished
    bucket, client = job["bucket"], s3.client()
    key = "finished/tokens/part-00001 (copy).parquet"
    client.copy_object(
        Bucket=bucket, Key=key, CopySource=f"{bucket}/finished/tokens/part-00001.parquet"
    )
    before = _keys(s3, bucket, "finished/")
    launcher.start(args, s3.env).wait().assert_one_error(
        2, "tokens/part-00001 (copy).parquet is not a shard of this job"
    )
    assert _keys(s3, bucket, "finished/") == before
    client.delete_object(Bucket=bucket, Key=key)
    rerun = launcher.start(args, s3.env).wait()
    rerun.assert_ok()
    assert "already complete" in rerun.stdout


def test_s3_output_dir_that_is_an_object_is_refused(s3, job, model_dirs, launcher):
    """output.dir naming an existing object: one line before any work, nothing written."""
    bucket = job["bucket"]
    s3.client().put_object(Bucket=bucket, Key="taken", Body=b"a user's object")
    args = settings(model_dirs["gpt2"], job["corpus"], f"s3://{bucket}/taken")
    launcher.start(args, s3.env).wait().assert_one_error(
        2, f"output.dir s3://{bucket}/taken is an object"
    )
    assert _keys(s3, bucket, "taken") == ["taken"]


def test_s3_report_without_endpoint_or_credentials_is_one_line(s3, finished, launcher):
    """`jobs.report` with the endpoint down, without credentials, or with keys that may read
    but not write: one line naming the cause each, exit 1."""
    out, _ = finished
    no_keys = {key: "" for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    cases = {
        "cannot reach the endpoint": {**s3.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
        "no credentials found": {
            **s3.env,
            **no_keys,
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent",
        },
        "access denied": {**s3.env, **s3_server_reader(s3)},
    }
    runs = {cause: launcher.start([out], env, module="jobs.report") for cause, env in cases.items()}
    for cause, run in runs.items():
        run.wait().assert_one_error(1, f"{out}", cause)
    assert not (storage.location(out) / "_report.html").exists()


def s3_server_reader(s3) -> dict[str, str]:
    """Keys of a user that may read the bucket but not write to it."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"],
    )
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    statements = [
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Effect": "Deny", "Action": ["s3:PutObject", "s3:DeleteObject"], "Resource": "*"},
    ]
    policy = iam.create_policy(
        PolicyName="reader",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}),
    )
    iam.attach_user_policy(UserName="reader", PolicyArn=policy["Policy"]["Arn"])
    return {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }
