"""Where inputs and outputs live: a local `pathlib.Path`, or an `ObjectPath` for a URI
(`s3://bucket/prefix`): the part of Path's interface the job uses, over a pyarrow filesystem
(S3, GCS, HDFS, or an installed fsspec implementation)."""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs

from lib.errors import UserError
from lib.storage import s3
from lib.storage.errors import S3_SCHEMES, StorageError, explain, storage_error

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


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
    conditional on the object's ETag and uploads aborted (lib/storage/s3.py)."""
    return is_remote(path) and path.scheme in S3_SCHEMES


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
        self.etag: str | None = None  # an S3 listing's (lib/storage/s3.py list_folder)

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
            if not found and self.scheme in S3_SCHEMES and bucket != self.key:
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
        if self.scheme in S3_SCHEMES and missing_ok:
            # boto3: pyarrow would leave a marker object for the folder it empties
            s3.call(self, "delete_object")
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


def listing(folder: AnyPath) -> list[AnyPath]:
    """A folder's entries; on S3 (with boto3) with each object's ETag."""
    if is_s3(folder):
        try:
            return [_listed(folder, entry) for entry in s3.list_folder(folder)]
        except UserError:  # no boto3: pyarrow lists the same names, without ETags
            pass
    return list(folder.iterdir())


def _listed(folder: ObjectPath, entry: s3.Listed) -> ObjectPath:
    kind = pafs.FileType.File if entry.etag is not None else pafs.FileType.Directory
    info = pafs.FileInfo(entry.key, kind, size=entry.size, mtime=entry.modified)
    path = ObjectPath(folder.fs, folder.scheme, entry.key, info)
    path.etag = entry.etag
    return path


def etag(path: ObjectPath) -> str | None:
    """An S3 object's ETag: from the listing that found it, else asked for."""
    if path.etag is None and is_s3(path):
        path.etag = s3.call(path, "head_object")["ETag"]
    return path.etag
