"""Input side: find the Parquet files, check their columns, split them into work units, read one."""

from __future__ import annotations

import glob
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lib import storage
from lib.config import InputConfig
from lib.errors import UserError, first_line
from lib.extract import pins


@dataclass(frozen=True)
class InputFile:
    path: str
    rows: int
    size: int
    modified: float | None = None  # seconds since the epoch
    pin: pins.Pin | None = field(default=None, compare=False, repr=False)  # what reads it


@dataclass(frozen=True)
class WorkUnit:
    """A row range of one input file; it becomes one shard in each output folder (tokens/,
    documents/) its `output.level` writes."""

    index: int
    file: str
    start: int
    stop: int
    row_offset: int  # global row index of `start`, used as the id when there is no id column
    pin: pins.Pin | None = field(default=None, compare=False, repr=False)  # its file's

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


_GLOB_CHARS = frozenset("*?[")
log = logging.getLogger(__name__)
_PARALLEL_FOOTERS = 32  # requests in flight when opening many files on an object store


def find_input_files(pattern: str) -> list[str]:
    """Resolve a Parquet file, a directory of them (recursively) or a glob, in sorted path order;
    local paths or object-store URIs."""
    if storage.is_uri(pattern):
        return _find_objects(pattern)
    pattern = os.path.expanduser(pattern)
    path = Path(pattern)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        read = [
            p
            for p in path.rglob("*.parquet")
            if p.is_file()
            and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
        ]
        if not read:
            raise UserError(f"input.path {pattern}: directory holds no *.parquet files")
        if log.isEnabledFor(logging.INFO):  # -v says what a mixed directory left out
            _log_ignored(pattern, path, read)
        return sorted(str(p) for p in read)
    if not _GLOB_CHARS & set(pattern):
        raise UserError(f"input.path {pattern}: no such file or directory")
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise UserError(f"input.path {pattern}: no file matches this pattern")
    return files


def _log_ignored(pattern: str, folder: Path, read: list[Path]) -> None:
    """Name the files under `folder` that the job does not read (a walk of every file, so only
    when the message is shown)."""
    ignored = sorted(
        str(p.relative_to(folder)) for p in set(folder.rglob("*")) - set(read) if p.is_file()
    )
    if ignored:
        log.info(
            "input.path %s: %d *.parquet files read; %d others ignored (not *.parquet, or under "
            "a name starting with . or _): %s",
            pattern,
            len(read),
            len(ignored),
            ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else ""),
        )


def _find_objects(uri: str) -> list[str]:
    """find_input_files on an object store: one listing, never a download."""
    try:
        path = storage.location(uri)
        if not _GLOB_CHARS & set(uri):
            if path.is_file():
                return [str(path)]
            files = sorted(
                str(p)
                for p in path.files()
                if p.name.endswith(".parquet")
                and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
            )
            if not files:
                raise UserError(f"input.path {uri}: no *.parquet files under this location")
            return files
        fixed = uri[: min(uri.index(c) for c in _GLOB_CHARS if c in uri)].rsplit("/", 1)[0]
        regex = storage.glob_regex(str(storage.location(uri)))
        files = sorted(str(p) for p in storage.location(fixed).files() if regex.match(str(p)))
    except OSError as exc:
        raise UserError(f"input.path {uri}: {storage.explain(exc)}") from None
    if not files:
        raise UserError(f"input.path {uri}: no file matches this pattern")
    return files


def is_string(tp: pa.DataType) -> bool:
    """Plain, large, view or dictionary-encoded (pandas categorical) strings."""
    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    return pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp)


def is_messages(tp: pa.DataType) -> bool:
    """Conversations: lists of structs with a string `role` and a `content`, or JSON text."""
    if is_string(tp):
        return True
    if not (pa.types.is_list(tp) or pa.types.is_large_list(tp)):
        return False
    item = tp.value_type
    if not pa.types.is_struct(item):
        return False
    names = [item.field(i).name for i in range(item.num_fields)]
    return "content" in names and "role" in names and is_string(item.field("role").type)


def _check_columns(path: str, schema: pa.Schema, cfg: InputConfig) -> None:
    names = schema.names
    wanted = [
        ("input.text_column", cfg.text_column),
        ("input.id_column", cfg.id_column),
        ("input.target_column", cfg.target_column),
        ("input.messages_column", cfg.messages_column),
    ]
    for key, column in wanted:
        if column is not None and column not in names:
            existing = ", ".join(names) or "none"
            raise UserError(f"{key}: no column {column!r} in {path}; its columns are {existing}")
    for key, column in (
        ("input.text_column", cfg.text_column),
        ("input.target_column", cfg.target_column),
    ):
        if column is not None and not is_string(schema.field(column).type):
            tp = schema.field(column).type
            raise UserError(f"{key}: column {column!r} in {path} has type {tp}; expected strings")
    if cfg.messages_column is not None and not is_messages(schema.field(cfg.messages_column).type):
        tp = schema.field(cfg.messages_column).type
        raise UserError(
            f"input.messages_column: column {cfg.messages_column!r} in {path} has type {tp}; "
            "expected lists of {role, content} structs, or JSON text of such lists"
        )
    if cfg.id_column is not None:
        tp = schema.field(cfg.id_column).type
        if not (pa.types.is_integer(tp) or is_string(tp)):
            raise UserError(
                f"input.id_column: column {cfg.id_column!r} in {path} has type {tp}; "
                "expected integers or strings"
            )


def _footer(path: str) -> tuple[pins.Pin, pa.Schema, int] | UserError:
    """A file pinned (lib/extract/pins.py) with its schema and rows, or the UserError that names what
    is wrong."""
    try:
        held = pins.pin(path)
    except UserError as exc:
        return exc
    try:
        meta = pq.ParquetFile(held.open())
        return held, meta.schema_arrow, meta.metadata.num_rows
    except UserError as exc:  # changed while it was read
        return exc
    except storage.StorageError as exc:
        return UserError(f"input file {path}: cannot read it: {exc}")
    except (pa.ArrowException, OSError) as exc:
        return UserError(f"input file {path} is not valid Parquet: {first_line(exc)}")


def _footers(paths: list[str]) -> list:
    """`_footer` of every file; an object store's many at once (each is a few requests)."""
    if len(paths) > 1 and storage.is_uri(paths[0]):
        with ThreadPoolExecutor(_PARALLEL_FOOTERS) as pool:
            return list(pool.map(_footer, paths))
    return [_footer(path) for path in paths]


def inspect_inputs(cfg: InputConfig) -> list[InputFile]:
    """Open every input file's footer, check the configured columns, and count rows."""
    inputs = []
    id_type = None
    paths = find_input_files(cfg.path)
    found_all = _footers(paths)
    for found in found_all:
        if isinstance(found, UserError):
            close(f for f in found_all if not isinstance(f, UserError))
            raise found
    for path, (held, schema, rows) in zip(paths, found_all, strict=True):
        _check_columns(path, schema, cfg)
        if cfg.id_column is not None:
            tp = schema.field(cfg.id_column).type
            if id_type is not None and is_string(tp) != is_string(id_type):
                raise UserError(
                    f"input.id_column: column {cfg.id_column!r} in {path} has type {tp}, "
                    f"other files have {id_type}"
                )
            id_type = id_type or tp
        inputs.append(InputFile(path, rows, held.size, held.modified, held))
    return inputs


def close(inputs) -> None:
    """Let go of the input files `inspect_inputs` holds (InputFiles, or their footers)."""
    for item in inputs:
        held = item.pin if isinstance(item, InputFile) else item[0]
        if held is not None:
            held.close()


def _open(item: InputFile) -> pa.NativeFile | str:
    """A reader of an input file: through its pin, or by path for one that was never pinned."""
    return item.pin.open() if item.pin is not None else storage.open_input(item.path)


def id_type(inputs: list[InputFile], cfg: InputConfig) -> pa.DataType:
    """The Arrow type of the output `id` column: string or int64."""
    if cfg.id_column is None:
        return pa.int64()
    tp = pq.ParquetFile(_open(inputs[0])).schema_arrow.field(cfg.id_column).type
    return pa.string() if is_string(tp) else pa.int64()


def _read_column(item: InputFile, column: str) -> pa.ChunkedArray:
    try:
        # ParquetFile, not read_table: read_table goes through pyarrow.dataset, whose import
        # pulls in pandas (0.2 s of a job's start-up)
        return pq.ParquetFile(_open(item)).read(columns=[column]).column(0)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(
            f"input file {item.path}: cannot read column {column!r}: {first_line(exc)}"
        ) from None


def as_ids(column: pa.ChunkedArray | pa.Array, path: str, name: str) -> pa.ChunkedArray | pa.Array:
    """Ids as string or int64, the two types the output's `id` column can have."""
    try:
        return column.cast(pa.string()) if is_string(column.type) else column.cast(pa.int64())
    except pa.ArrowInvalid as exc:  # e.g. a uint64 id beyond int64
        raise UserError(
            f"input.id_column: column {name!r} in {path} does not fit int64 ids: {first_line(exc)}"
        ) from None


def check_unique_ids(inputs: list[InputFile], cfg: InputConfig) -> None:
    """Refuse null or duplicate ids, naming one and its files, since results join back by id."""
    if cfg.id_column is None:
        return
    columns = []
    for item in inputs:
        column = _read_column(item, cfg.id_column)
        if column.null_count:
            raise UserError(
                f"input.id_column: column {cfg.id_column!r} in {item.path} has "
                f"{column.null_count} null id(s); every row needs an id"
            )
        column = as_ids(column, item.path, cfg.id_column)
        bad = invalid_utf8(column)
        if len(bad):
            raise UserError(
                f"input.id_column: column {cfg.id_column!r} in {item.path} holds an id that is "
                f"not valid UTF-8 (row {bad[0]}); ids must be text or integers"
            )
        columns.append(column)
    chunks = [chunk for column in columns for chunk in column.chunks]
    ids = pa.chunked_array(chunks, type=columns[0].type)
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        value, times = repeated[0]["values"].as_py(), repeated[0]["counts"].as_py()
        where = [
            storage.location(item.path).name
            for item, column in zip(inputs, columns, strict=True)
            if pc.any(pc.equal(column, value)).as_py()
        ]
        raise UserError(
            f"input.id_column: id {value!r} occurs {times} times (in {', '.join(where)}); "
            f"ids in column {cfg.id_column!r} must be unique"
        )


def plan_units(inputs: list[InputFile], shard_rows: int) -> list[WorkUnit]:
    """Split every file into ranges of `shard_rows` rows; the numbering is stable across runs."""
    units = []
    offset = 0
    for item in inputs:
        for start in range(0, item.rows, shard_rows):
            stop = min(start + shard_rows, item.rows)
            units.append(WorkUnit(len(units), item.path, start, stop, offset + start, item.pin))
        offset += item.rows
    return units


_BINARY = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}
if hasattr(pa, "string_view"):
    _BINARY[pa.string_view()] = pa.binary_view()


def invalid_utf8(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Indices of the strings in `column` that are not valid UTF-8 (a binary column read as
    text); Arrow checks a whole chunk at once, so only a bad chunk is looked at row by row."""
    if not is_string(column.type):
        return np.zeros(0, np.int64)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    bad, offset = [], 0
    for chunk in chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            if pa.types.is_dictionary(chunk.type):
                chunk = chunk.cast(chunk.type.value_type, safe=False)
            values = chunk.view(_BINARY[chunk.type])
            for i, value in enumerate(values.to_pylist()):
                if value is not None:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        bad.append(offset + i)
        offset += len(chunk)
    return np.array(bad, np.int64)


@dataclass
class UnitRows:
    """A unit's rows, with an `id` column first, and the rows whose text could not be read."""

    table: pa.Table
    unreadable: list[tuple[int, str]]  # (row in unit, reason), the text or target nulled


def read_unit(unit: WorkUnit, cfg: InputConfig) -> UnitRows:
    """Read the unit's rows (only the row groups that overlap it) through its file's pin, then
    check the file still holds the bytes the job started with."""
    wanted = (cfg.id_column, cfg.text_column, cfg.target_column, cfg.messages_column)
    columns = [c for c in wanted if c is not None]
    held = unit.pin if unit.pin is not None else pins.pin(unit.file)
    try:
        parquet = pq.ParquetFile(held.open())
        groups, first_row, row = [], 0, 0
        for index in range(parquet.metadata.num_row_groups):
            count = parquet.metadata.row_group(index).num_rows
            if row < unit.stop and row + count > unit.start:
                first_row = row if not groups else first_row
                groups.append(index)
            row += count
        table = parquet.read_row_groups(groups, columns=list(dict.fromkeys(columns)))
        held.check()
    except (pa.ArrowException, OSError) as exc:
        held.check()  # a file changed under the read is named as such
        raise UserError(
            f"input file {unit.file}: cannot read rows {unit.start}-{unit.stop - 1}: "
            f"{first_line(exc)}"
        ) from None
    finally:
        if held is not unit.pin:
            held.close()
    table = table.slice(unit.start - first_row, unit.rows)
    if table.num_rows != unit.rows:  # the file shrank after the job planned its units
        raise pins.changed(unit.file, f"rows {unit.start}-{unit.stop - 1} were planned")
    if cfg.id_column is None:
        ids = pa.array(np.arange(unit.row_offset, unit.row_offset + unit.rows, dtype=np.int64))
    else:
        ids = as_ids(table.column(cfg.id_column).combine_chunks(), unit.file, cfg.id_column)
    out = {"id": ids}
    messages = cfg.messages_column
    if messages is not None and not is_string(table.schema.field(messages).type):
        out["messages"] = table.column(messages).combine_chunks()  # checked when tokenized
        messages = None
    unreadable = []
    for name, column, reason in (
        ("text", cfg.text_column, "invalid_utf8_text"),
        ("target", cfg.target_column, "invalid_utf8_target"),
        ("messages", messages, "invalid_utf8_messages"),
    ):
        if column is None:
            continue
        values = _plain_strings(table.column(column)).combine_chunks()
        bad = invalid_utf8(values)
        if len(bad):  # rare: rebuilt in Python, the bad rows null
            raw = values.view(_BINARY[values.type]).to_pylist()
            for row in bad:
                raw[row] = None
            values = pa.array([None if v is None else v.decode() for v in raw], pa.string())
            unreadable += [(int(row), reason) for row in bad]
        out[name] = values
    return UnitRows(pa.table(out), sorted(unreadable))


def _plain_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Decode a dictionary-encoded (categorical) string column; other string types pass through."""
    return column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column
