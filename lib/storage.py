"""Where inputs and outputs live: a local path, or a URI (`s3://bucket/prefix`) on an object store.

A local path stays a `pathlib.Path`, with the POSIX guarantees the job builds on (fsync,
exclusive create, atomic rename). A URI becomes an `ObjectPath`: the part of Path's interface the
job uses, over a pyarrow filesystem (S3, GCS, HDFS, or an installed fsspec implementation). Three
writes differ on an object store, and this module owns all three for both kinds of path (the
S3 requests themselves are in lib/s3.py):

- `Sink`: a streamed file that becomes visible whole, under its final name, only when published;
  locally a temporary renamed into place, on S3 a multipart upload completed (or aborted), on
  other stores a temporary object moved into place;
- `put_atomic`: a small file written whole;
- `create_exclusive`: create a file only if there is none (O_EXCL; S3's `If-None-Match: *`).

S3 writes go through boto3 (lib/s3.py); reads and listings go through pyarrow. Both take
credentials, region and `AWS_ENDPOINT_URL` from the standard AWS environment variables and
config files.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import re
import shutil
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs

from lib import faults
from lib.errors import UserError

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_HASH_BLOCK = 8 << 20
_S3 = ("s3", "s3a")

_NO_CREDENTIALS = (
    "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
)
# What S3 and pyarrow report, and what it means for the user.
_CAUSES = (
    (("NoSuchBucket", "NO_SUCH_BUCKET"), "the bucket does not exist"),
    (
        ("InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID", "Access Key Id you provided does not"),
        "the access key is not valid (check AWS_ACCESS_KEY_ID or AWS_PROFILE)",
    ),
    (
        ("SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH", "signature we calculated does not"),
        "the secret key does not match the access key (check AWS_SECRET_ACCESS_KEY)",
    ),
    (
        ("AccessDenied", "ACCESS_DENIED", "Forbidden"),
        "access denied (check the credentials, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
        "AWS_PROFILE, and the bucket's permissions)",
    ),
    (("ExpiredToken", "EXPIRED_TOKEN"), "the credentials have expired"),
    (("NoCredentialsError", "Unable to locate credentials"), _NO_CREDENTIALS),
    (
        ("Could not connect", "EndpointConnectionError", "NETWORK_CONNECTION", "Couldn't connect"),
        "cannot reach the endpoint (check AWS_ENDPOINT_URL and the network)",
    ),
)


class StorageError(OSError):
    """An object store refused or failed a request; its text is one line for the user, `code`
    the store's error code (`PreconditionFailed`) where it gave one."""

    def __init__(self, message: str, filename: str | None = None, code: str | None = None):
        super().__init__(message)
        self.filename = filename
        self.code = code

    def __str__(self) -> str:
        return self.args[0]


def _known_cause(exc: BaseException) -> str | None:
    text = f"{type(exc).__name__} {exc}"
    for markers, cause in _CAUSES:
        if any(marker in text for marker in markers):
            return cause
    return None


def explain(exc: BaseException) -> str:
    """An object store's error as a short cause (`the bucket does not exist`)."""
    cause = _known_cause(exc)
    if cause is not None:
        return cause
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _no_credentials() -> bool:
    """Whether the standard AWS chain (variables, config files, instance roles) finds none."""
    try:
        import botocore.session
    except ImportError:
        return False  # cannot tell
    try:
        return botocore.session.get_session().get_credentials() is None
    except Exception:
        return False


def storage_error(exc: BaseException, path: object) -> OSError:
    """`exc` (pyarrow's, botocore's) as a StorageError with a one-line cause naming `path`."""
    if isinstance(exc, FileNotFoundError):
        return exc
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")  # botocore's ClientError
    cause = _known_cause(exc)
    if cause is None and str(path).startswith(tuple(f"{s}://" for s in _S3)) and _no_credentials():
        # unsigned requests fail in store-specific ways (403, 500) that name no cause
        cause = _NO_CREDENTIALS
    return StorageError(cause or explain(exc), str(path), code)


# -- locations ---------------------------------------------------------------------------------
def is_uri(text: object) -> bool:
    """Whether `text` names an object-store location (`s3://...`); `file://` is a local path."""
    match = isinstance(text, str) and _URI.match(text)
    return bool(match) and match.group(1).lower() != "file"


def location(text: str | os.PathLike) -> Path | ObjectPath:
    """A local `Path` (with `~` expanded), or an `ObjectPath` for a URI."""
    if isinstance(text, Path | ObjectPath):
        return text
    text = str(text)
    match = _URI.match(text)
    if not match:
        return Path(os.path.expanduser(text))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        return Path(rest)
    rest = rest.strip("/")
    if not rest:
        raise UserError(f"{text}: no bucket in this URI")
    return ObjectPath(filesystem(scheme, rest.split("/", 1)[0]), scheme, rest)


def is_remote(path: object) -> bool:
    """Whether `path` is on an object store (an ObjectPath), not the local filesystem."""
    return isinstance(path, ObjectPath)


def is_s3(path: object) -> bool:
    """Whether `path` is on S3 (or a store that speaks its API), where writes can be made
    conditional on the object's ETag and uploads aborted (lib/s3.py)."""
    return is_remote(path) and path.scheme in _S3


def s3():
    """lib.s3, imported on first use (it imports this module; boto3 is needed only there)."""
    from lib import s3 as module

    return module


@functools.cache
def filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """The pyarrow filesystem for a scheme (and, for S3, the bucket's region), else fsspec's."""
    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
        return fs
    except (pa.ArrowInvalid, ValueError) as exc:
        if "Unrecognized filesystem type" not in str(exc):
            raise UserError(f"{scheme}://{bucket}: {explain(exc)}") from None
    except OSError as exc:  # S3 resolves the bucket's region here
        cause = explain(exc)
        if "not found" in str(exc).lower() and "bucket" in str(exc).lower():
            cause = "the bucket does not exist"
        raise UserError(f"{scheme}://{bucket}: {cause}") from None
    try:
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError):
        raise UserError(
            f"{scheme}://{bucket}: neither pyarrow nor an installed fsspec package reads {scheme}://"
        ) from None


class Stat(NamedTuple):
    st_size: int
    st_mtime: float


class ObjectPath:
    """A path on a pyarrow filesystem, with the part of `pathlib.Path`'s interface the job uses.

    Object stores have no folders: a folder exists when a key lies under it, `mkdir` does nothing.
    """

    def __init__(
        self, fs: pafs.FileSystem, scheme: str, key: str, listed: pafs.FileInfo | None = None
    ):
        self.fs = fs
        self.scheme = scheme
        self.key = key.strip("/")  # fsspec lists "/bucket/key" where pyarrow says "bucket/key"
        self._listed = listed  # what the listing that found this path said: no request to ask
        self.etag: str | None = None  # an S3 listing's (lib/s3.py list_folder)

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(self.fs, self.scheme, f"{self.key}/{name}")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: ObjectPath) -> bool:
        return self.key < other.key

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.fs, self.scheme, self.key.rsplit("/", 1)[0])

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def as_posix(self) -> str:
        return str(self)

    def resolve(self) -> ObjectPath:
        return self

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        if not self.is_relative_to(other):
            raise ValueError(f"{self} is not in {other}")
        return PurePosixPath(self.key[len(other.key) + 1 :])

    def is_relative_to(self, other: object) -> bool:
        return (
            isinstance(other, ObjectPath)
            and other.scheme == self.scheme
            and (self.key == other.key or self.key.startswith(other.key + "/"))
        )

    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.key)
        except OSError as exc:
            raise storage_error(exc, self) from None

    def _type(self) -> pafs.FileType:
        return (self._listed or self._info()).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def stat(self) -> Stat:
        info = self._listed or self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(2, "No such file", str(self))
        mtime = info.mtime.timestamp() if isinstance(info.mtime, datetime) else 0.0
        return Stat(info.size or 0, mtime)

    def _list(self, recursive: bool) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.key, allow_not_found=True, recursive=recursive)
        try:
            found = self.fs.get_file_info(selector)
            bucket = self.key.split("/", 1)[0]
            if not found and self.scheme in _S3 and bucket != self.key:
                # pyarrow lists a missing bucket as an empty folder: say which it is
                if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise StorageError("the bucket does not exist", str(self), "NoSuchBucket")
            return found
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error(exc, self) from None

    def iterdir(self) -> list[ObjectPath]:
        return [ObjectPath(self.fs, self.scheme, info.path, info) for info in self._list(False)]

    def glob(self, pattern: str) -> list[ObjectPath]:
        """Entries of this folder whose names match `pattern` (no `/` in it)."""
        return [p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]

    def files(self) -> list[ObjectPath]:
        """Every file below this folder, at any depth."""
        return [
            ObjectPath(self.fs, self.scheme, info.path, info)
            for info in self._list(True)
            if info.type == pafs.FileType.File
        ]

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.key) as handle:
                return handle.read()
        except OSError as exc:
            raise storage_error(exc, self) from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def unlink(self, missing_ok: bool = False) -> None:
        if self.scheme in _S3 and missing_ok:
            # boto3: pyarrow would leave a marker object for the folder it empties
            s3().call(self, "delete_object")
            return
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as exc:
            raise storage_error(exc, self) from None

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a folder of an object store exists once a key lies under it."""

    def remove_tree(self) -> None:
        try:
            self.fs.delete_dir(self.key)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(exc, self) from None


AnyPath = Path | ObjectPath


def glob_regex(pattern: str) -> re.Pattern:
    """A glob (with `**`) as a regex over whole paths or URIs, the way glob.glob reads it."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


# -- reading -----------------------------------------------------------------------------------
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


def listing(folder: AnyPath) -> list[AnyPath]:
    """A folder's entries; on S3 (with boto3) with each object's ETag."""
    if is_s3(folder):
        try:
            return s3().list_folder(folder)
        except UserError:  # no boto3: pyarrow lists the same names, without ETags
            pass
    return list(folder.iterdir())


def etag(path: ObjectPath) -> str | None:
    """An S3 object's ETag: from the listing that found it, else asked for."""
    if path.etag is None and is_s3(path):
        path.etag = s3().call(path, "head_object")["ETag"]
    return path.etag


def matches(path: AnyPath, entry: dict) -> bool:
    """Whether the file still is the one a record describes. On S3 the ETag the job recorded
    when it published the object: any write makes a new one, and S3 checks the bytes under it
    itself. Elsewhere every byte is hashed (`bytes`, `sha256`)."""
    try:
        if entry.get("etag") and is_s3(path):
            return path.stat().st_size == entry.get("bytes") and etag(path) == entry["etag"]
        digest, size = sha256(path)
    except OSError:
        return False
    return size == entry.get("bytes") and digest == entry.get("sha256")


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
        if path.scheme in _S3:
            return s3().create_tagged(path, data) is not None
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
    if path.scheme in _S3:
        s3().put(path, data)
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
        elif final.scheme in _S3:
            self._upload = s3().Upload(final)
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
