"""Input side: find the Parquet files, check their columns, split them into work units, read one."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lib.config import InputConfig
from lib.errors import UserError


@dataclass(frozen=True)
class InputFile:
    path: str
    rows: int
    size: int


@dataclass(frozen=True)
class WorkUnit:
    """A row range of one input file; it becomes exactly one output shard."""

    index: int
    file: str
    start: int
    stop: int
    row_offset: int  # global row index of `start`, used as the id when there is no id column

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


def find_input_files(pattern: str) -> list[str]:
    """Resolve a Parquet file, a directory of them (recursively) or a glob, in sorted path order."""
    path = Path(pattern)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(
            str(p)
            for p in path.rglob("*.parquet")
            if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"input.path {pattern}: directory holds no *.parquet files")
        return files
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise UserError(f"input.path {pattern}: no file matches")
    return files


def _is_string(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp)


def _check_columns(path: str, schema: pa.Schema, cfg: InputConfig) -> None:
    names = schema.names
    wanted = [("input.text_column", cfg.text_column), ("input.id_column", cfg.id_column),
              ("input.target_column", cfg.target_column)]
    for key, column in wanted:
        if column is not None and column not in names:
            raise UserError(
                f"{key}: column {column!r} not in {path}; columns are {', '.join(names)}"
            )
    for key, column in (("input.text_column", cfg.text_column), ("input.target_column", cfg.target_column)):
        if column is not None and not _is_string(schema.field(column).type):
            raise UserError(
                f"{key}: column {column!r} in {path} has type {schema.field(column).type}, expected string"
            )
    if cfg.id_column is not None:
        tp = schema.field(cfg.id_column).type
        if not (pa.types.is_integer(tp) or _is_string(tp)):
            raise UserError(
                f"input.id_column: column {cfg.id_column!r} in {path} has type {tp}, expected integer or string"
            )


def inspect_inputs(cfg: InputConfig) -> list[InputFile]:
    """Open every input file's footer, check the configured columns, and count rows."""
    inputs = []
    id_type = None
    for path in find_input_files(cfg.path):
        try:
            meta = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"input file {path} is not valid Parquet: {str(exc).splitlines()[0]}") from None
        schema = meta.schema_arrow
        _check_columns(path, schema, cfg)
        if cfg.id_column is not None:
            tp = schema.field(cfg.id_column).type
            if id_type is not None and _is_string(tp) != _is_string(id_type):
                raise UserError(f"input.id_column: column {cfg.id_column!r} in {path} has type {tp}, "
                                f"other files have {id_type}")
            id_type = id_type or tp
        inputs.append(InputFile(path, meta.metadata.num_rows, os.path.getsize(path)))
    return inputs


def id_type(inputs: list[InputFile], cfg: InputConfig) -> pa.DataType:
    """The Arrow type of the output `id` column: string or int64."""
    if cfg.id_column is None:
        return pa.int64()
    tp = pq.ParquetFile(inputs[0].path).schema_arrow.field(cfg.id_column).type
    return pa.string() if _is_string(tp) else pa.int64()


def check_unique_ids(inputs: list[InputFile], cfg: InputConfig) -> None:
    """Refuse duplicate ids, naming one, since results are joined back to the input by id."""
    if cfg.id_column is None:
        return
    chunks = []
    for item in inputs:
        column = pq.read_table(item.path, columns=[cfg.id_column]).column(0)
        if column.null_count:
            raise UserError(f"input.id_column: column {cfg.id_column!r} in {item.path} has null ids")
        chunks.append(column.cast(pa.string()) if _is_string(column.type) else column.cast(pa.int64()))
    ids = pa.chunked_array([c for chunk in chunks for c in chunk.chunks], type=chunks[0].type)
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise UserError(f"input.id_column: id {repeated[0].as_py()!r} occurs more than once")


def plan_units(inputs: list[InputFile], shard_rows: int) -> list[WorkUnit]:
    """Split every file into ranges of `shard_rows` rows; the numbering is stable across runs."""
    units = []
    offset = 0
    for item in inputs:
        for start in range(0, item.rows, shard_rows):
            stop = min(start + shard_rows, item.rows)
            units.append(WorkUnit(len(units), item.path, start, stop, offset + start))
        offset += item.rows
    return units


def read_unit(unit: WorkUnit, cfg: InputConfig) -> pa.Table:
    """Read the unit's rows (only the row groups that overlap it) with an `id` column first."""
    columns = [c for c in (cfg.id_column, cfg.text_column, cfg.target_column) if c is not None]
    parquet = pq.ParquetFile(unit.file)
    groups, first_row, row = [], None, 0
    for index in range(parquet.metadata.num_row_groups):
        count = parquet.metadata.row_group(index).num_rows
        if row < unit.stop and row + count > unit.start:
            groups.append(index)
            first_row = row if first_row is None else first_row
        row += count
    table = parquet.read_row_groups(groups, columns=list(dict.fromkeys(columns)))
    table = table.slice(unit.start - first_row, unit.rows)
    if cfg.id_column is None:
        ids = pa.array(np.arange(unit.row_offset, unit.row_offset + unit.rows, dtype=np.int64))
    else:
        ids = table.column(cfg.id_column).combine_chunks()
        ids = ids.cast(pa.string()) if _is_string(ids.type) else ids.cast(pa.int64())
    out = {"id": ids, "text": table.column(cfg.text_column)}
    if cfg.target_column is not None:
        out["target"] = table.column(cfg.target_column)
    return pa.table(out)
