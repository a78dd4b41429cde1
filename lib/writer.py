"""Output side: the row schema, shards committed atomically, the manifest and the success marker.

A shard is written under a hidden name (`.part-00042.parquet.tmp`, which pyarrow and pandas
skip), closed, fsynced and renamed into place, then the directory is fsynced. Its bookkeeping
(rows, rank, skipped ids, counts) goes to `_units/part-00042.json` just before the rename, so a
visible `part-*` file always has complete rows and a complete record beside it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

UNITS_DIR = "_units"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
SKIPPED = "_skipped.parquet"
JOB = "_job.json"
EXTENSIONS = {"parquet": "parquet", "arrow": "arrow"}


def output_schema(
    id_type: pa.DataType, k: int, vocab_size: int, logits_dtype: str, full: bool
) -> pa.Schema:
    """One row per scored position; top-k columns, or a `logits` column in full mode."""
    value_type = pa.float16() if logits_dtype == "float16" else pa.float32()
    fields = [
        pa.field("id", id_type, nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32()),
        pa.field("token_logprob", pa.float32()),
        pa.field("token_rank", pa.int32()),
        pa.field("logsumexp", pa.float32(), nullable=False),
    ]
    if full:
        fields.append(pa.field("logits", pa.list_(value_type, vocab_size), nullable=False))
    else:
        fields.append(pa.field("topk_ids", pa.list_(pa.int32(), k), nullable=False))
        fields.append(pa.field("topk_logits", pa.list_(value_type, k), nullable=False))
    return pa.schema(fields)


def _fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    width = values.shape[1]
    flat = pa.array(values.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def to_table(
    schema: pa.Schema,
    ids: pa.Array,
    row: np.ndarray,
    position: np.ndarray,
    token_id: np.ndarray,
    stats: dict[str, np.ndarray],
) -> pa.Table:
    """Build output rows from numpy arrays with no per-row Python objects."""
    no_token = ~stats["has_token"]
    columns = {
        "id": ids.take(pa.array(row)),
        "position": pa.array(position, type=pa.int32()),
        "token_id": pa.array(token_id.astype(np.int32), mask=no_token),
        "token_logprob": pa.array(stats["token_logprob"].astype(np.float32), mask=no_token),
        "token_rank": pa.array(stats["token_rank"].astype(np.int32), mask=no_token),
        "logsumexp": pa.array(stats["logsumexp"].astype(np.float32)),
    }
    for name in ("logits", "topk_ids", "topk_logits"):
        if name in schema.names:
            columns[name] = _fixed_list(stats[name], schema.field(name).type.value_type)
    return pa.Table.from_pydict(columns, schema=schema)


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at a named point when LOGIT_EXTRACT_CRASH_AT names it.

    The value is `point` or `point:N` (the N-th time the point is reached, counting from 1).
    Only a real kill leaves files the way a preempted job does.
    """
    wanted = os.environ.get("LOGIT_EXTRACT_CRASH_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    crash_point.seen = getattr(crash_point, "seen", 0) + 1
    if crash_point.seen >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file under a temporary name, fsync it, rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def shard_path(out_dir: Path, name: str, fmt: str) -> Path:
    return out_dir / f"{name}.{EXTENSIONS[fmt]}"


class ShardWriter:
    """Streams tables into one shard's temporary file and commits or discards it."""

    def __init__(self, out_dir: Path, name: str, schema: pa.Schema, fmt: str):
        self.out_dir = out_dir
        self.name = name
        self.final = shard_path(out_dir, name, fmt)
        self.tmp = out_dir / f".{self.final.name}.tmp"
        self.rows = 0
        self._writer = None
        self._sink = pa.OSFile(str(self.tmp), "wb")
        try:
            if fmt == "parquet":
                self._writer = pq.ParquetWriter(
                    self._sink,
                    schema,
                    compression="zstd",
                    use_dictionary=["id"],
                    write_statistics=["id", "position"],
                )
            else:
                self._writer = pa.ipc.new_file(self._sink, schema)
        except BaseException:
            self.abort()
            raise

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows
            crash_point("shard_write")

    def commit(self, record: dict) -> None:
        """Close and fsync the shard, write its record, then make it visible under its name."""
        try:
            self._writer.close()
            self._sink.close()
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            crash_point("before_rename")
            write_atomic(
                self.out_dir / UNITS_DIR / f"{self.name}.json",
                json.dumps({"file": self.final.name, "rows": self.rows, **record}).encode(),
            )
            crash_point("between_record_and_shard")
        except BaseException:
            self.abort()  # e.g. a full disk while closing: never rename a file that may be short
            raise
        os.replace(self.tmp, self.final)
        fsync_dir(self.out_dir)

    def abort(self) -> None:
        """Discard the temporary file; a writer closed by an exception would leave partial rows."""
        try:
            # Close the format writer first (its footer goes to a file we delete): left open,
            # a ParquetWriter closes itself when garbage-collected and writes to a closed sink.
            if self._writer is not None:
                try:
                    self._writer.close()
                except Exception:
                    pass
            self._sink.close()
        finally:
            self.tmp.unlink(missing_ok=True)
