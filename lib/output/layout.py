"""The output directory: the one owner of its file names, temporaries, records and manifest.

    OUT/tokens/part-00042.parquet   token rows; this folder holds nothing but committed shards
    OUT/documents/part-00042.parquet   one row per document (output.level documents or both)
    OUT/_job.json                   fingerprint, input checksums and run id of the job
    OUT/_lock.json                  the live job's lease (lib/output/lease.py)
    OUT/_units/part-00042.json      a committed unit's record: its shards' rows, bytes and
                                    sha256, counts, partial scores
    OUT/_tmp/                       temporaries, named after the process that writes them
    OUT/_skipped/skipped.parquet, OUT/_manifest.json, OUT/_SUCCESS   written last, in order
    OUT/_report.html                the run report (lib/inspect/report.py), after the job or
                                    on demand

Everything at OUT that is not a data folder starts with `_`, which pyarrow and pandas skip, and
nothing at OUT ends in `.parquet`: `pd.read_parquet(OUT)` and `pyarrow.dataset.dataset(OUT)`
read the token rows (at output.level=tokens), and a glob `OUT/*.parquet` matches no file
rather than the wrong one. Outputs written before the report and the skipped rows moved there
(`report.html`, `_skipped.parquet` at OUT) still read; a run of the job moves them.

OUT is a local path or an object-store URI (lib/storage): on an object store a shard is
uploaded under its final name and appears only when its upload completes, so `_tmp` stays empty.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

from lib import storage
from lib.errors import output_error
from lib.output.lease import Process, tag_alive
from lib.output.records import Manifest, UnitRecord
from lib.storage import AnyPath, s3

TOKENS = "tokens"
DOCUMENTS = "documents"
UNITS = "_units"
TMP = "_tmp"
JOB = "_job.json"
LOCK = "_lock.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
SKIPPED_DIR = "_skipped"
SKIPPED = f"{SKIPPED_DIR}/skipped.parquet"
REPORT = "_report.html"
# where outputs written before kept them (read, and moved by the next run of the job)
OLD_SKIPPED, OLD_REPORT = "_skipped.parquet", "report.html"
EXTENSIONS = {"parquet": "parquet", "arrow": "arrow"}
# 1: shards at OUT itself; 2: shards in OUT/tokens with checksums; 3: entropy, documents,
# scores, and a record's shards listed under "files"
FORMAT_VERSION = 3
_SHARD = re.compile(rf"part-\d{{5,}}\.({'|'.join(EXTENSIONS.values())})")
_PARALLEL_READS = 32  # requests in flight when reading many records from an object store
_OURS = {TOKENS, DOCUMENTS, UNITS, TMP, JOB, LOCK, MANIFEST, SUCCESS, SKIPPED_DIR, REPORT}
_OURS |= {OLD_SKIPPED, OLD_REPORT}

_writer_tag: str | None = None


def writer_tag() -> str:
    """This process's tag in temporary file names (host@pid@start)."""
    global _writer_tag
    if _writer_tag is None:
        _writer_tag = Process.current().tag
    return _writer_tag


# -- names ---------------------------------------------------------------------------------
def folders(level: str) -> tuple[str, ...]:
    """The shard folders of an `output.level`; a unit commits one shard in each."""
    return {"tokens": (TOKENS,), "documents": (DOCUMENTS,), "both": (TOKENS, DOCUMENTS)}[level]


def shard_name(name: str, fmt: str, folder: str = TOKENS) -> str:
    """A shard's path relative to OUT, as the manifest and unit records store it."""
    return f"{folder}/{name}.{EXTENSIONS[fmt]}"


def shard_names(name: str, fmt: str, level: str) -> list[str]:
    """A unit's shard paths relative to OUT, in the order its record lists them."""
    return [shard_name(name, fmt, folder) for folder in folders(level)]


def shard_path(out_dir: AnyPath, name: str, fmt: str, folder: str = TOKENS) -> AnyPath:
    """A unit's shard in `folder` of OUT."""
    return out_dir / shard_name(name, fmt, folder)


def record_path(out_dir: AnyPath, name: str) -> AnyPath:
    """A unit's record, OUT/_units/NAME.json: written once its shards are committed."""
    return out_dir / UNITS / f"{name}.json"


def temp_path(out_dir: AnyPath, final: AnyPath) -> AnyPath:
    """A temporary for `final`, unique to this process, in OUT/_tmp (a document shard's name
    starts with `documents-`, as token and document shards of a unit share a name)."""
    folder = final.parent.name
    name = final.name if folder != DOCUMENTS else f"{folder}-{final.name}"
    return out_dir / TMP / f"{name}@{writer_tag()}.tmp"


def is_ours(name: str) -> bool:
    """Whether an entry of OUT is one this job writes (anything else is the user's)."""
    return name in _OURS


def skipped_path(out_dir: AnyPath) -> AnyPath:
    """The skipped rows' file: where this version writes it, else where an older one did."""
    path = out_dir / SKIPPED
    if path.exists() or not (out_dir / OLD_SKIPPED).exists():
        return path
    return out_dir / OLD_SKIPPED


def report_path(out_dir: AnyPath) -> AnyPath:
    """The run report: where this version writes it, else where an older one did."""
    path = out_dir / REPORT
    if path.exists() or not (out_dir / OLD_REPORT).exists():
        return path
    return out_dir / OLD_REPORT


def shard_files(out_dir: AnyPath, folder: str = TOKENS) -> list[AnyPath]:
    """The committed shards of a folder, in name order (the order readers use): files named as
    the job names them, so a copy (`part-00001 (copy).parquet`) is never read as one."""
    path = out_dir / folder
    if not storage.is_remote(path) and not path.is_dir():
        return []
    return sorted(p for p in storage.listing(path) if _SHARD.fullmatch(p.name) and p.is_file())


def listed_shards(out_dir: AnyPath, folder: str = TOKENS) -> list[AnyPath]:
    """The shards the project's readers read: those the manifest of a finished output lists
    (a file someone added is not one), else the committed ones in the folder."""
    manifest = read_manifest(out_dir) if (out_dir / SUCCESS).exists() else None
    if manifest is None:
        return shard_files(out_dir, folder)
    return [out_dir / e.file for e in manifest.shards if e.file.startswith(f"{folder}/")]


def read_as_data(name: str) -> bool:
    """Whether readers of a data folder read an entry of this name: every reader skips names
    starting with `.` or `_` (pyarrow, pandas, Polars, DuckDB, Hugging Face datasets)."""
    return not name.startswith((".", "_"))


def data_entries(out_dir: AnyPath, level: str) -> list[str]:
    """Every entry of the level's data folders that readers would read, relative to OUT (files
    and folders alike: a reader descends into a folder)."""
    found = []
    for folder in folders(level):
        path = out_dir / folder
        if storage.is_remote(path) or path.is_dir():
            found += [relative(out_dir, p) for p in path.iterdir() if read_as_data(p.name)]
    return sorted(found)


def visible_shards(out_dir: AnyPath, level: str) -> dict[str, AnyPath]:
    """The shards in OUT by relative name, from one listing per folder: on an object store a
    request per unit would cost minutes on a large job (and the listing knows their sizes)."""
    return {
        relative(out_dir, path): path
        for folder in folders(level)
        for path in shard_files(out_dir, folder)
    }


def relative(out_dir: AnyPath, path: AnyPath) -> str:
    """`path` relative to OUT, with forward slashes (as the manifest names shards)."""
    return path.relative_to(out_dir).as_posix()


# -- temporaries -----------------------------------------------------------------------------
def temporaries(out_dir: AnyPath) -> list[AnyPath]:
    """Every temporary file in OUT: they all live in `_tmp`."""
    folder = out_dir / TMP
    if not storage.is_remote(folder) and not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file())


def temporary_writer_alive(path: AnyPath) -> bool | None:
    """Whether the process that writes a temporary lives: False when it is known gone (it ran
    on this machine), None when that cannot be told (another machine, or no tag)."""
    tag = _tag(path)
    return tag_alive(tag) if tag else None


def _tag(path: AnyPath) -> str:
    """The writer tag in a temporary's name (`NAME@host@pid@start.tmp`), '' if none."""
    return path.name[: -len(".tmp")].split("@", 1)[-1] if "@" in path.name else ""


def remove_dead_temporaries(out_dir: AnyPath, *, holding_lease: bool = True) -> int:
    """Delete temporaries whose writer is gone and return how many. Holding the lease (writers
    on other machines have stopped) that is any but those of live processes on this machine,
    and on S3 the unfinished uploads of killed writers too; without it (a finished job's rerun,
    `jobs.report`) only those whose writer is known dead."""
    removed = s3.abort_uploads(out_dir) if holding_lease and storage.is_s3(out_dir) else 0
    for path in temporaries(out_dir):
        if holding_lease:  # this process writes nothing yet: its own are leftovers too
            keep = _tag(path) != writer_tag() and temporary_writer_alive(path)
        else:
            keep = temporary_writer_alive(path) is not False
        if not keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def remove_own_temporaries(out_dir: AnyPath) -> None:
    """Delete this process's temporaries (after an error, a signal or the end of a run)."""
    for path in temporaries(out_dir):
        if f"@{writer_tag()}." in path.name:
            path.unlink(missing_ok=True)


# -- durable writes --------------------------------------------------------------------------
def write_atomic(path: AnyPath, data: bytes, out_dir: AnyPath) -> None:
    """Write a small file whole (storage.put_atomic through a temporary of this process); an
    I/O error becomes an OutputError naming `path`."""
    try:
        storage.put_atomic(path, data, temp_path(out_dir, path))
    except OSError as exc:
        raise output_error(path, exc) from None


# -- records ---------------------------------------------------------------------------------
def read_json(path: AnyPath) -> dict | None:
    """A JSON object from `path`; None when it is missing, empty, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_manifest(out_dir: AnyPath) -> Manifest | None:
    """OUT/_manifest.json, None when it is missing, unreadable or malformed."""
    try:
        return Manifest.from_json(read_json(out_dir / MANIFEST))
    except ValueError:
        return None


def read_record(path: AnyPath) -> UnitRecord | None:
    """A unit record, None when it is missing, unreadable or malformed."""
    try:
        return UnitRecord.from_json(read_json(path))
    except ValueError:
        return None


def read_records(out_dir: AnyPath, names: list[str]) -> dict[str, UnitRecord | None]:
    """Unit records by name (None where missing, unreadable or malformed); on an object store,
    where each is a request, many at once."""
    paths = [record_path(out_dir, name) for name in names]
    if storage.is_remote(out_dir) and len(paths) > 1:
        with ThreadPoolExecutor(_PARALLEL_READS) as pool:
            return dict(zip(names, pool.map(read_record, paths), strict=True))
    return {name: read_record(path) for name, path in zip(names, paths, strict=True)}


def write_json(path: AnyPath, data: dict, out_dir: AnyPath) -> None:
    """`data` as indented JSON, written atomically (see write_atomic)."""
    write_atomic(path, json.dumps(data, indent=2).encode(), out_dir)


def clear(out_dir: AnyPath) -> None:
    """Remove every entry this job writes (output.overwrite=true), the lease excepted."""
    for entry in out_dir.iterdir():
        if is_ours(entry.name) and entry.name != LOCK:
            storage.remove(entry)
