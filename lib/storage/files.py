"""Reading, hashing and writing files wherever they live (lib/storage/paths.py).

A local path keeps the POSIX guarantees the job builds on (fsync, exclusive create, atomic
rename). Three writes differ on an object store, and this module owns all three for both kinds
of path (the S3 requests themselves are in lib/storage/s3.py):

- `Sink`: a streamed file that becomes visible whole, under its final name, only when published;
  locally a temporary renamed into place, on S3 a multipart upload completed (or aborted), on
  other stores a temporary object moved into place;
- `put_atomic`: a small file written whole;
- `create_exclusive`: create a file only if there is none (O_EXCL; S3's `If-None-Match: *`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from lib import faults
from lib.storage import s3
from lib.storage.errors import storage_error
from lib.storage.paths import AnyPath, ObjectPath, is_remote, is_s3, location
from lib.storage.paths import etag as object_etag

_HASH_BLOCK = 8 << 20


def open_input(path: AnyPath | str) -> str | pa.NativeFile:
    """What pyarrow readers take for `path`: the local path itself, or an open random-access
    file that reads ranges on demand (a corpus or shard is never staged whole)."""
    path = location(path)
    if not is_remote(path):
        return str(path)
    try:
        return path.fs.open_input_file(path.key)
    except OSError as exc:
        raise storage_error(exc, path) from None


def open_stream(path: AnyPath | str):
    """A file object reading `path` from its start (a context manager)."""
    path = location(path)
    if not is_remote(path):
        return open(path, "rb")
    try:
        return path.fs.open_input_stream(path.key)
    except OSError as exc:
        raise storage_error(exc, path) from None


def open_mapped(path: AnyPath | str) -> pa.NativeFile:
    """A random-access file for an Arrow IPC reader: a memory map locally (batches stay on
    disk, zero-copy), an open object otherwise."""
    path = location(path)
    if not is_remote(path):
        return pa.memory_map(str(path))
    return open_input(path)


def dataset_files(paths: list[AnyPath]) -> tuple[list[str], pafs.FileSystem | None]:
    """Paths and filesystem for `pyarrow.dataset.dataset(paths, filesystem=...)`."""
    if paths and is_remote(paths[0]):
        return [p.key for p in paths], paths[0].fs
    return [str(p) for p in paths], None


def sha256(path: AnyPath) -> tuple[str, int]:
    """The file's sha256 hex digest and its size in bytes, streamed in blocks."""
    digest = hashlib.sha256()
    size = 0
    if is_remote(path):
        try:
            with path.fs.open_input_stream(path.key) as handle:
                while block := handle.read(_HASH_BLOCK):
                    digest.update(block)
                    size += len(block)
        except OSError as exc:
            raise storage_error(exc, path) from None
        return digest.hexdigest(), size
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def matches(path: AnyPath, *, size: int, digest: str, etag: str | None = None) -> bool:
    """Whether the file still is the one a record describes. On S3 the ETag the job recorded
    when it published the object: any write makes a new one, and S3 checks the bytes under it
    itself. Elsewhere every byte is hashed."""
    try:
        if etag and is_s3(path):
            return path.stat().st_size == size and object_etag(path) == etag
        found, found_size = sha256(path)
    except OSError:
        return False
    return found_size == size and found == digest


def remove(path: AnyPath) -> None:
    """Delete a file or a folder, if it is there."""
    if is_remote(path):
        if path.is_dir():
            path.remove_tree()
        else:
            path.unlink(missing_ok=True)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# -- durable writes ----------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make a file's bytes durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        faults.point("fsync", path)
        os.fsync(fd)
    finally:
        os.close(fd)


def put_atomic(path: AnyPath, data: bytes, temp: AnyPath) -> None:
    """Write a small file whole: locally through `temp` (fsynced, then renamed into place), on
    an object store in one PUT. Nothing is left at `temp` after an error."""
    if is_remote(path):
        faults.point("write", path)
        faults.point("rename", path)
        _put(path, data)
        return
    try:
        temp.parent.mkdir(exist_ok=True)
        with open(temp, "wb") as handle:
            faults.point("write", temp)
            handle.write(data)
            handle.flush()
            faults.point("fsync", temp)
            os.fsync(handle.fileno())
        faults.point("rename", path)
        os.replace(temp, path)
        fsync_dir(path.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def create_exclusive(path: AnyPath, data: bytes) -> bool:
    """Create `path` holding `data` only if nothing is there; False if something is. Atomic
    locally (O_EXCL, also on NFS v3 and later) and on S3 (a conditional PUT); other object
    stores check first and then write, which two jobs starting in the same instant can both pass
    (each commit's lease check then stops one of them)."""
    if is_remote(path):
        if is_s3(path):
            return s3.create_tagged(path, data) is not None
        if path.exists():
            return False
        _put(path, data)
        return True
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # an empty file would read as someone else's
        raise
    os.close(fd)
    return True


def touch(path: AnyPath, data: bytes) -> None:
    """Renew `path`'s modification time: locally without rewriting it (needs no free space),
    on an object store by writing it again."""
    if is_remote(path):
        _put(path, data)
    else:
        os.utime(path)


def _put(path: ObjectPath, data: bytes) -> None:
    if is_s3(path):
        s3.put(path, data)
        return
    try:
        with path.fs.open_output_stream(path.key) as handle:
            handle.write(data)
    except OSError as exc:
        raise storage_error(exc, path) from None


class Sink:
    """A file being written that becomes visible under `final` only when published, whole.

    `file` is what pyarrow writers write to; `close()` ends the writing and returns the sha256
    and size of what was written; `publish()` makes it visible; `abort()` discards it.
    """

    def __init__(self, final: AnyPath, temp: AnyPath):
        self.final = final
        self.temp = temp
        self.file: pa.NativeFile | None = None
        self._upload = None  # an object store's upload
        if not is_remote(final):
            temp.parent.mkdir(exist_ok=True)
            self.file = pa.OSFile(str(temp), "wb")
        elif is_s3(final):
            self._upload = s3.Upload(final)
            self.file = pa.PythonFile(self._upload, mode="w")
        else:
            self._upload = _StreamUpload(final, temp)
            self.file = pa.PythonFile(self._upload, mode="w")

    def close(self) -> tuple[str, int]:
        """Finish writing (locally: close and fsync); the sha256 and size of the bytes."""
        self.file.close()
        if self._upload is not None:
            return self._upload.digest.hexdigest(), self._upload.size
        fsync_file(self.temp)
        return sha256(self.temp)

    def publish(self) -> str | None:
        """Make the file visible under its name; an S3 object's ETag, else None."""
        faults.point("rename", self.final)
        if self._upload is not None:
            return self._upload.complete()
        self.final.parent.mkdir(exist_ok=True)
        os.replace(self.temp, self.final)  # our own temporary: a rename never takes another's
        fsync_dir(self.final.parent)
        return None

    def abort(self) -> None:
        """Discard what was written; nothing becomes visible."""
        try:
            if self.file is not None and not self.file.closed:
                self.file.close()
        except Exception:
            pass
        finally:
            if self._upload is not None:
                self._upload.abort()
            else:
                self.temp.unlink(missing_ok=True)


class _StreamUpload:
    """Another store's object: written to a temporary object, moved into place on `complete()`."""

    def __init__(self, final: ObjectPath, temp: ObjectPath):
        self.final = final
        self.temp = temp
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False
        try:
            self._stream = final.fs.open_output_stream(temp.key)
        except OSError as exc:
            raise storage_error(exc, temp) from None

    def write(self, data) -> int:
        data = bytes(data)
        self.digest.update(data)
        self.size += len(data)
        self._stream.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self._stream.closed:
            self._stream.close()

    def complete(self) -> None:
        self.close()
        try:
            self.final.fs.move(self.temp.key, self.final.key)
        except OSError as exc:
            raise storage_error(exc, self.final) from None

    def abort(self) -> None:
        try:
            self.close()
        except OSError:
            pass
        self.temp.unlink(missing_ok=True)
