"""Shards committed atomically.

A unit's shards (token rows, document rows, or both) are written to sinks that nobody sees yet
(lib/storage: a temporary of this process in OUT/_tmp, or an object store's upload), closed
and hashed. The unit's record (each shard's rows, bytes and sha256, then rank, skipped ids,
counts, scores) goes to `_units/part-00042.json`, then each shard is published as
`tokens/part-00042.parquet` (`documents/...`): a visible shard always has complete rows and a
record whose checksum proves them.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from lib import faults, storage
from lib.errors import output_error
from lib.output import compact, layout
from lib.output.records import ShardEntry, UnitRecord
from lib.storage import AnyPath


def parquet_options(schema: pa.Schema) -> dict:
    """ParquetWriter options for a shard of `schema`: zstd, a dictionary for the ids (a run of
    rows shares one), statistics on the keys; compact rows add their columns' encodings."""
    options = {
        "compression": "zstd",
        "use_dictionary": ["id"],
        "write_statistics": ["id", "position"],
    }
    if "topk_id_codes" in schema.names:
        options["column_encoding"] = compact.COLUMN_ENCODINGS
    return options


class ShardWriter:
    """Streams tables into one shard's temporary file; `commit` makes it visible or discards it."""

    def __init__(
        self, out_dir: AnyPath, name: str, schema: pa.Schema, fmt: str, folder: str = layout.TOKENS
    ):
        self.out_dir = out_dir
        self.name = name
        self.final = layout.shard_path(out_dir, name, fmt, folder)
        self.tmp = layout.temp_path(out_dir, self.final)
        # what an error names: the temporary on a local disk, else the object being uploaded
        self._where = self.final if storage.is_remote(out_dir) else self.tmp
        self.rows = 0
        self.footer = None  # the key-value metadata of a compact shard's footer
        self._writer = None
        self._sink = None
        try:
            self._sink = storage.Sink(self.final, self.tmp)
            if fmt == "parquet":
                self._writer = pq.ParquetWriter(self._sink.file, schema, **parquet_options(schema))
            else:
                self._writer = pa.ipc.new_file(self._sink.file, schema)
        except OSError as exc:
            self.abort()
            raise output_error(self._where, exc) from None
        except BaseException:
            self.abort()
            raise

    def write(self, table: pa.Table) -> None:
        """Append rows to the shard's temporary file (nothing is visible until commit)."""
        if not table.num_rows:
            return
        try:
            faults.point("write", self.tmp)
            if self.footer or (table.schema.metadata and self.rows):
                raise RuntimeError(f"{self.tmp}: a compact shard is written in one table")
            self._writer.write_table(table)
            if table.schema.metadata:  # compact rows: the id order of the whole file
                self.footer = table.schema.metadata
                self._writer.add_key_value_metadata(self.footer)
        except OSError as exc:
            self.abort()
            raise output_error(self._where, exc) from None
        self.rows += table.num_rows
        faults.point("shard_write")

    def _finish(self) -> ShardEntry:
        """Close, fsync and hash the temporary; its entry for the unit record."""
        faults.point("shard_close", self.tmp)
        self._writer.close()
        sha256, size = self._sink.close()
        return ShardEntry(layout.relative(self.out_dir, self.final), self.rows, size, sha256)

    def _publish(self) -> str | None:
        return self._sink.publish()

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
        finally:
            if self._sink is not None:
                self._sink.abort()
            else:
                storage.remove(self.tmp)


def commit(
    shards: list[ShardWriter], record: UnitRecord, check_lease: Callable[[], None]
) -> UnitRecord:
    """Close, fsync and hash a unit's shards, write its record (their entries added), then make
    the shards visible under their names; `check_lease` raises if another job took the
    directory over. A failure discards every temporary. Returns the record."""
    first = shards[0]
    path = layout.record_path(first.out_dir, first.name)

    def record_them() -> None:
        record.files = [shard._finish() for shard in shards]
        faults.point("before_rename")
        check_lease()
        layout.write_json(path, record.to_json(), first.out_dir)
        faults.point("between_record_and_shard")

    etags = _committed(shards, record_them)
    if any(etags):  # S3 names the object it now holds: a rerun compares that, not bytes
        for entry, etag in zip(record.files, etags, strict=True):
            entry.etag = etag
        layout.write_json(path, record.to_json(), first.out_dir)
    return record


def publish(shard: ShardWriter) -> ShardEntry:
    """Close, fsync, hash and publish one shard that no unit record describes (an export)."""
    entries: list[ShardEntry] = []
    [etag] = _committed([shard], lambda: entries.append(shard._finish()))
    entries[0].etag = etag
    return entries[0]


def _committed(shards: list[ShardWriter], before: Callable[[], None]) -> list[str | None]:
    """Run `before` (closing the shards and recording them), then publish each shard; a
    failure discards every temporary. Each shard's ETag on S3 (else None)."""
    try:
        before()
        return [shard._publish() for shard in shards]
    except OSError as exc:
        for shard in shards:
            shard.abort()  # e.g. a full disk while closing: never rename a file that may be short
        raise output_error(getattr(exc, "filename", None) or shards[0]._where, exc) from None
    except BaseException:
        for shard in shards:
            shard.abort()
        raise
