"""A local S3-compatible server for the tests: moto's server mode in a subprocess, with real
authentication (a request with unknown keys is refused as by AWS) and small multipart parts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

# moto refuses parts under 5 MiB as S3 does; the tests upload multipart shards of a few KiB.
MIN_PART_BYTES = 1024


class S3Server:
    """`env`: the AWS variables a client needs (valid keys, endpoint, region)."""

    def __init__(self, log_path: str):
        env = {
            **os.environ,
            # The first four requests (the IAM user, its key, a policy, its attachment) need no
            # signature; every later one is checked against IAM, so bad keys are refused.
            "INITIAL_NO_AUTH_ACTION_COUNT": "4",
            "S3_UPLOAD_PART_MIN_SIZE": str(MIN_PART_BYTES),
        }
        for _ in range(3):  # a free port can be taken between the probe and the server
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            self.endpoint = f"http://127.0.0.1:{port}"
            with open(log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            if self._wait():
                break
        else:
            raise RuntimeError(f"moto server did not start (see {log_path})")
        self.env = {
            **self._user(),
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def _wait(self) -> bool:
        """Whether the server answers; False (and stopped) if it exited or never answered."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1)
                time.sleep(0.2)  # an answer from another server on a raced port: ours exits
                if self.process.poll() is None:
                    return True
                break
            except OSError:
                time.sleep(0.05)
        self.close()
        return False

    def _user(self) -> dict[str, str]:
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="tests")
        key = iam.create_access_key(UserName="tests")["AccessKey"]
        allow = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        policy = iam.create_policy(
            PolicyName="all",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [allow]}),
        )
        iam.attach_user_policy(UserName="tests", PolicyArn=policy["Policy"]["Arn"])
        return {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }

    def client(self):
        """A boto3 S3 client with the valid keys."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
