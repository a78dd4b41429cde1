"""The S3 side of lib/storage, through boto3: conditional writes and multipart uploads.

pyarrow reads and lists S3 for the job, but it can neither abort a multipart upload (its
streams complete on close, even after an error, which would publish a half-written shard) nor
make a write conditional on an object's version; boto3 can. It takes credentials, region and
`AWS_ENDPOINT_URL` from the standard AWS environment variables and config files, as pyarrow does.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from typing import NamedTuple, Protocol

from lib.errors import UserError
from lib.storage.errors import StorageError, storage_error

# An S3 part: at least 5 MiB (the last excepted); 10,000 parts of 16 MiB allow 160 GB shards,
# and each shard being written holds at most one part in memory.
PART_BYTES = 16 << 20


class Located(Protocol):
    """What names an object: `bucket/key` (lib/storage/paths.py's Located)."""

    key: str


class Listed(NamedTuple):
    """An entry of a listing: an object (with its ETag) or a folder (`etag` None)."""

    key: str
    size: int | None
    modified: datetime | None
    etag: str | None


def bucket_key(path: Located) -> tuple[str, str]:
    """The bucket and the key within it."""
    bucket, _, key = path.key.partition("/")
    return bucket, key


_clients: dict[int, object] = {}


def client():
    """A boto3 S3 client for this process (fork-safe: a child makes its own)."""
    made = _clients.get(os.getpid())
    if made is None:
        try:
            import boto3
        except ImportError:
            raise UserError(
                "writing to s3:// needs boto3: pip install 'logit-extract[s3]'"
            ) from None
        made = boto3.session.Session().client("s3")
        _clients[os.getpid()] = made
    return made


def forget_clients() -> None:
    """Drop the clients made so far: the next request reads the environment again."""
    _clients.clear()


def call(path: Located, method: str, **kwargs) -> dict:
    """One S3 request; its failure as a StorageError with a one-line cause."""
    bucket, key = bucket_key(path)
    try:
        return getattr(client(), method)(Bucket=bucket, Key=key, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # botocore's ClientError and connection errors
        raise storage_error(exc, path) from None


_CONFLICTS = ("PreconditionFailed", "ConditionalRequestConflict")


def put(path: Located, data: bytes, **condition: str) -> str | None:
    """PUT an object, with `IfNoneMatch="*"` or `IfMatch=etag` if given; its new ETag, or None
    when the condition failed."""
    try:
        return call(path, "put_object", Body=data, **condition)["ETag"]
    except StorageError as exc:
        if condition and exc.code in _CONFLICTS:
            return None
        raise


def read_tagged(path: Located) -> tuple[bytes, float, str] | None:
    """An S3 object's bytes, modification time and ETag in one request; None if missing."""
    try:
        answer = call(path, "get_object")
    except StorageError as exc:
        if exc.code in ("NoSuchKey", "404"):
            return None
        raise
    return answer["Body"].read(), answer["LastModified"].timestamp(), answer["ETag"]


def create_tagged(path: Located, data: bytes) -> str | None:
    """Create an S3 object only if there is none (`If-None-Match: *`); its ETag, or None."""
    return put(path, data, IfNoneMatch="*")


def replace_tagged(path: Located, data: bytes, etag: str) -> str | None:
    """Replace an S3 object only if it still has `etag` (`If-Match`): a compare-and-swap; the
    new ETag, or None if it changed (or is gone)."""
    try:
        return put(path, data, IfMatch=etag)
    except StorageError as exc:
        if exc.code in ("NoSuchKey", "404"):
            return None
        raise


def list_folder(folder: Located) -> list[Listed]:
    """A folder's objects and subfolders in one listing (1,000 a request), the objects with
    their size, time and ETag, which pyarrow's listing leaves out."""
    bucket, prefix = bucket_key(folder)
    found = []
    try:
        pages = (
            client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=prefix + "/", Delimiter="/")
        )
        for page in pages:
            for item in page.get("Contents", []):
                key = f"{bucket}/{item['Key']}"
                found.append(Listed(key, item["Size"], item["LastModified"], item["ETag"]))
            for common in page.get("CommonPrefixes", []):
                found.append(Listed(f"{bucket}/{common['Prefix'].rstrip('/')}", None, None, None))
    except UserError:
        raise
    except Exception as exc:
        raise storage_error(exc, folder) from None
    return found


def abort_uploads(folder: Located) -> int:
    """Abort the unfinished multipart uploads under `folder` (left by killed writers; call it
    only while no live writer uploads there); how many."""
    bucket, prefix = bucket_key(folder)
    s3 = client()
    aborted = 0
    try:
        pages = s3.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=prefix + "/"
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                s3.abort_multipart_upload(
                    Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted += 1
    except Exception as exc:
        raise storage_error(exc, folder) from None
    return aborted


class Upload:
    """A multipart upload fed by writes: parts go up as they fill, the object appears only at
    `complete()`, and `abort()` leaves nothing (a killed process leaves an incomplete upload,
    invisible, which a bucket lifecycle rule removes). Small objects take a single PUT."""

    def __init__(self, path: Located):
        self.path = path
        self.digest = hashlib.sha256()
        self.size = 0
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict] = []

    # the file interface pa.PythonFile calls
    closed = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")  # no copy of Arrow's buffer but into the part
        self.digest.update(view)
        self.size += len(view)
        self._buffer += view
        if len(self._buffer) >= PART_BYTES:
            self._send_part()
        return len(view)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """pa.PythonFile closes its handle; the upload stays open until complete or abort."""

    def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = call(self.path, "create_multipart_upload")["UploadId"]
        number = len(self._parts) + 1
        answer = call(
            self.path,
            "upload_part",
            UploadId=self._upload_id,
            PartNumber=number,
            Body=self._buffer,
        )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        self._buffer = bytearray()

    def complete(self) -> str:
        """Make the object visible; its ETag."""
        if self._upload_id is None:
            etag = put(self.path, self._buffer)
        else:
            if self._buffer or not self._parts:
                self._send_part()
            etag = call(
                self.path,
                "complete_multipart_upload",
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )["ETag"]
        self._buffer = bytearray()
        self._upload_id = None
        return etag

    def abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                call(self.path, "abort_multipart_upload", UploadId=upload_id)
            except OSError:
                pass  # an incomplete upload stays invisible; a lifecycle rule removes it
