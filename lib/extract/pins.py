"""Input files held from the job's start, so that every read sees the bytes it fingerprinted.

- A local file is opened once and read through that handle (`os.pread`): a file replaced under
  its name (`cp new x.tmp && mv x.tmp x`) no longer matters, the handle keeps the old inode. A
  write in place moves the file's ctime, which no program can set back: each unit compares the
  handle's stamp after reading, and a stamp that moved fails the job unless the bytes still hash
  to the fingerprinted sha256 (a `chmod` moves it too).
- An S3 object is read by the ETag the job fingerprinted (`If-Match` on every ranged GET): a
  replaced object fails the read. This needs boto3 (`logit-extract[s3]`).
- Other object stores (and S3 without boto3) are read through pyarrow, with the size and
  modification time compared after each unit.

Before `_SUCCESS` the job hashes every input again by its name (`recheck`): the output must
describe the input on disk, the one `jobs.verify --input` and a rerun read.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from lib import storage
from lib.errors import UserError

_HASH_BLOCK = 8 << 20
_HASH_THREADS = 4  # sha256 releases the GIL: files hash side by side


def changed(path: str, how: str = "its bytes are not those the job started with") -> UserError:
    """The refusal for an input that changed while the job ran."""
    return UserError(
        f"input file {path} changed while the job ran ({how}); restore it and run the same "
        "command to finish, or start over with output.overwrite=true"
    )


class RangeReader(io.RawIOBase):
    """A read-only, seekable file over `read_at(offset, size) -> bytes`, for pa.PythonFile."""

    def __init__(self, size: int, read_at: Callable[[int, int], bytes]):
        super().__init__()
        self._size = size
        self._read_at = read_at
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        end = self._size if size < 0 else min(self._size, self._position + size)
        if end <= self._position:
            return b""
        data = self._read_at(self._position, end - self._position)
        self._position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _stamp(fd: int) -> tuple[int, int, int, int]:
    """What moves whenever a file's bytes change: inode, size, mtime and ctime."""
    st = os.fstat(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class LocalPin:
    """A local input file, open from the job's start."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise UserError(f"input file {path}: cannot read it: {exc.strerror}") from None
        self.stamp = _stamp(self._fd)
        self.size = self.stamp[1]
        self.modified = self.stamp[2] / 1e9
        self.sha256: str | None = None  # once hashed here or confirmed against the main rank

    def open(self) -> pa.NativeFile:
        """A reader of the pinned bytes, with a position of its own."""
        return pa.PythonFile(RangeReader(self.size, self._pread), mode="r")

    def _pread(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def _hash(self) -> tuple[str, int]:
        digest, offset = hashlib.sha256(), 0
        while block := os.pread(self._fd, _HASH_BLOCK, offset):
            digest.update(block)
            offset += len(block)
        return digest.hexdigest(), offset

    def proof(self) -> dict:
        """What the fingerprint takes for these bytes: their size and sha256."""
        sha256, size = self._hash()
        if _stamp(self._fd) != self.stamp:
            raise changed(self.path, "it was written to while the job hashed it")
        self.sha256 = sha256
        return {"size": size, "sha256": sha256}

    def shared(self) -> list:
        """What another rank compares its own handle with (same file: no second hash)."""
        return list(self.stamp)

    def confirm(self, entry: dict, stamp: list | None) -> None:
        """On another rank: this handle holds the bytes the main rank hashed (`entry`)."""
        if stamp is None or list(self.stamp) != stamp:
            sha256, _ = self._hash()
            if sha256 != entry.get("sha256") or _stamp(self._fd) != self.stamp:
                raise changed(self.path)
        self.sha256 = entry.get("sha256")

    def check(self) -> None:
        """Raise if the bytes may have changed since they were hashed."""
        now = _stamp(self._fd)
        if now == self.stamp:
            return
        if self.sha256 is None or self._hash()[0] != self.sha256 or _stamp(self._fd) != now:
            raise changed(self.path)
        self.stamp = now  # the same bytes (a chmod, a touch): no need to hash again

    def close(self) -> None:
        os.close(self._fd)


class S3Pin:
    """An S3 object, read by the ETag it had when the job started."""

    def __init__(self, path: str):
        from lib.storage import s3

        self.path = path
        self._object = storage.location(path)
        head = s3.call(self._object, "head_object")
        self.size = int(head["ContentLength"])
        self.modified = head["LastModified"].timestamp()
        self.etag = head["ETag"]

    def open(self) -> pa.NativeFile:
        return pa.PythonFile(RangeReader(self.size, self._get), mode="r")

    def _get(self, offset: int, size: int) -> bytes:
        from lib.storage import s3

        try:
            answer = s3.call(
                self._object,
                "get_object",
                Range=f"bytes={offset}-{offset + size - 1}",
                IfMatch=self.etag,
            )
        except storage.StorageError as exc:
            if exc.code in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                raise changed(self.path, "its ETag is no longer the one fingerprinted") from None
            raise
        return answer["Body"].read()

    def proof(self) -> dict:
        return {"size": self.size, "etag": self.etag}

    def shared(self) -> None:
        return None

    def confirm(self, entry: dict, stamp: None) -> None:
        if entry.get("etag") != self.etag:
            raise changed(self.path)

    def check(self) -> None:
        """Nothing to do: every read was conditional on the ETag."""

    def close(self) -> None:
        pass


class StorePin:
    """An object of another store: read through pyarrow, checked by size and time."""

    def __init__(self, path: str):
        self.path = path
        stat = storage.location(path).stat()
        self.size, self.modified = stat.st_size, stat.st_mtime

    def open(self) -> pa.NativeFile:
        return storage.open_input(self.path)

    def proof(self) -> dict:
        return {"size": self.size, "modified": self.modified}

    def shared(self) -> None:
        return None

    def confirm(self, entry: dict, stamp: None) -> None:
        if (entry.get("size"), entry.get("modified")) != (self.size, self.modified):
            raise changed(self.path)

    def check(self) -> None:
        try:
            stat = storage.location(self.path).stat()
        except FileNotFoundError:
            raise changed(self.path, "it is gone") from None
        if (stat.st_size, stat.st_mtime) != (self.size, self.modified):
            raise changed(self.path)

    def close(self) -> None:
        pass


Pin = LocalPin | S3Pin | StorePin


def pin(path: str) -> Pin:
    """Hold the input file at `path` for the rest of the job."""
    location = storage.location(path)
    if not storage.is_remote(location):
        return LocalPin(path)
    if storage.is_s3(location):
        try:
            import boto3  # noqa: F401
        except ImportError:
            return StorePin(path)
        try:
            return S3Pin(path)
        except storage.StorageError as exc:
            raise UserError(f"input file {path}: cannot read it: {exc}") from None
    try:
        return StorePin(path)
    except OSError as exc:
        raise UserError(f"input file {path}: cannot read it: {storage.explain(exc)}") from None


def proofs(pins: list[Pin]) -> list[dict]:
    """Each pin's proof, local files hashed side by side."""
    if len(pins) < 2:
        return [p.proof() for p in pins]
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return list(pool.map(lambda p: p.proof(), pins))


def _on_disk(entry: dict) -> dict:
    """The proof of what the name in `entry` holds now (hashed again, read fresh by name)."""
    path = entry["path"]
    location = storage.location(path)
    if "sha256" in entry:
        sha256, size = storage.sha256(location)
        return {"size": size, "sha256": sha256}
    if "etag" in entry:
        from lib.storage import s3

        return {"size": entry["size"], "etag": s3.call(location, "head_object")["ETag"]}
    stat = location.stat()
    return {"size": stat.st_size, "modified": stat.st_mtime}


APPEARED = "it appeared under input.path"


def differences(files: list[dict], listed: list[str]) -> list[tuple[str, str]]:
    """Each input path that is not as `files` (the job's `_job.json` inputs) fingerprinted it,
    with how: listed but not fingerprinted (APPEARED) first, then gone or changed."""
    paths = [entry["path"] for entry in files]
    found = [(path, APPEARED) for path in sorted(set(listed) - set(paths))]

    def now(entry: dict) -> dict | None:
        try:
            return _on_disk(entry)
        except (OSError, UserError):
            return None

    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        proofs_now = list(pool.map(now, files))
    for entry, proof in zip(files, proofs_now, strict=True):
        if proof is None or entry["path"] not in listed:
            found.append((entry["path"], "it is gone"))
        elif any(entry.get(key) != value for key, value in proof.items()):
            found.append((entry["path"], "its bytes are not those the job started with"))
    return found


def recheck(files: list[dict], listed: list[str]) -> None:
    """Raise unless input.path still lists exactly `files` (the job's `_job.json` inputs) and
    each still holds the bytes they were fingerprinted with."""
    for path, how in differences(files, listed)[:1]:
        if how == APPEARED:
            raise UserError(
                f"input file {path} appeared under input.path while the job ran; move it away "
                "and run the same command to finish, or start over with output.overwrite=true"
            )
        raise changed(path, how)
