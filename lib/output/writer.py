"""Output rows: the schema, Arrow tables built from numpy, and shards committed atomically.

A unit's shards (token rows, document rows, or both) are written to sinks that nobody sees yet
(lib/storage.py: a temporary of this process in OUT/_tmp, or an object store's upload), closed
and hashed. The unit's record (each shard's rows, bytes and sha256, then rank, skipped ids,
counts, scores) goes to `_units/part-00042.json`, then each shard is published as
`tokens/part-00042.parquet` (`documents/...`): a visible shard always has complete rows and a
record whose checksum proves them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lib import faults, storage
from lib.errors import output_error
from lib.output import compact, layout
from lib.storage import AnyPath


def output_schema(
    id_type: pa.DataType,
    k: int,
    vocab_size: int,
    logits_dtype: str,
    *,
    full: bool,
    encoding: str = "plain",
) -> pa.Schema:
    """One row per scored position; top-k columns, or a `logits` column in full mode.

    `encoding="compact"` stores the top-k as `lib.output.compact` codes, the token log-probability on
    a 1/64-nat grid and the entropy as float16."""
    value_type = pa.float16() if logits_dtype == "float16" else pa.float32()
    entropy_type = pa.float16() if encoding == "compact" else pa.float32()
    fields = [
        pa.field("id", id_type, nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32()),
        pa.field("token_logprob", pa.float32()),
        pa.field("token_rank", pa.int32()),
        pa.field("logsumexp", pa.float32(), nullable=False),
        pa.field("entropy", entropy_type, nullable=False),
    ]
    if encoding == "compact":
        fields.append(pa.field("topk_id_codes", compact.CODE_TYPE, nullable=False))
        fields.append(pa.field("topk_logprob_deltas", compact.CODE_TYPE, nullable=False))
    elif full:
        fields.append(pa.field("logits", pa.list_(value_type, vocab_size), nullable=False))
    else:
        fields.append(pa.field("topk_ids", pa.list_(pa.int32(), k), nullable=False))
        fields.append(pa.field("topk_logits", pa.list_(value_type, k), nullable=False))
    return pa.schema(fields)


def _fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    width = values.shape[1]
    flat = pa.array(values.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _beyond_count(stats: dict[str, np.ndarray]) -> np.ndarray | None:
    """(n, k) True where an entry lies past its row's `topk_count` (top_p), else None."""
    if "topk_count" not in stats:
        return None
    return np.arange(stats["topk_ids"].shape[1]) >= stats["topk_count"][:, None]


def to_table(
    schema: pa.Schema,
    ids: pa.Array,
    row: np.ndarray,
    position: np.ndarray,
    token_id: np.ndarray,
    stats: dict[str, np.ndarray],
) -> pa.Table:
    """Build output rows from numpy arrays with no per-row Python objects.

    With `topk_count` (top_p), plain rows keep k entries, -1 and -inf past the count; compact
    rows keep only the counted ones, and carry their shard's id order as schema metadata."""
    no_token = ~stats["has_token"]
    compact_rows = "topk_id_codes" in schema.names
    token_logprob = stats["token_logprob"].astype(np.float32)
    if compact_rows:
        token_logprob = compact.round_token_logprobs(token_logprob)
    columns = {
        "id": ids.take(pa.array(row)),
        "position": pa.array(position, type=pa.int32()),
        "token_id": pa.array(token_id.astype(np.int32), mask=no_token),
        "token_logprob": pa.array(token_logprob, mask=no_token),
        "token_rank": pa.array(stats["token_rank"].astype(np.int32), mask=no_token),
        "logsumexp": pa.array(stats["logsumexp"].astype(np.float32)),
        "entropy": pa.array(
            stats["entropy"].astype(schema.field("entropy").type.to_pandas_dtype())
        ),
    }
    metadata = None
    if compact_rows:
        logprobs = (
            stats["topk_logits"].astype(np.float32) - columns["logsumexp"].to_numpy()[:, None]
        )
        codes, deltas, order = compact.encode(stats["topk_ids"], logprobs, stats.get("topk_count"))
        columns["topk_id_codes"], columns["topk_logprob_deltas"] = codes, deltas
        metadata = {compact.ID_ORDER_KEY: compact.pack_id_order(order)}
    beyond = _beyond_count(stats) if "topk_ids" in schema.names else None
    for name, fill in (("logits", None), ("topk_ids", -1), ("topk_logits", -np.inf)):
        if name in schema.names:
            values = stats[name]
            if beyond is not None:
                values = np.where(beyond, np.asarray(fill, values.dtype), values)
            columns[name] = _fixed_list(values, schema.field(name).type.value_type)
    if metadata is not None:
        schema = schema.with_metadata(metadata)
    return pa.Table.from_pydict(columns, schema=schema)


def examples_schema(positions: pa.Schema, seq2seq: bool) -> pa.Schema:
    """One row per input row: `id`, `input_ids` (and `decoder_input_ids`), then each per-position
    column as a list in position order."""
    fields = [positions.field("id"), pa.field("input_ids", pa.list_(pa.int32()), nullable=False)]
    if seq2seq:
        fields.append(pa.field("decoder_input_ids", pa.list_(pa.int32()), nullable=False))
    for field in positions:
        if field.name != "id":
            fields.append(pa.field(field.name, pa.list_(field.type), nullable=False))
    return pa.schema(fields)


def to_examples(
    schema: pa.Schema,
    positions: pa.Table,
    rows: np.ndarray,
    input_ids: dict[int, list[int]],
    decoder_start: int | None,
) -> pa.Table:
    """Group position rows (sorted by row, then position) into one row per example.

    `decoder_input_ids` is the teacher-forced decoder input: the start token, then each
    position's token but the last (in generate mode, the greedy tokens).
    """
    starts = np.flatnonzero(np.diff(rows, prepend=-1))
    offsets = pa.array(np.append(starts, len(rows)).astype(np.int32))
    example_rows = rows[starts]
    sequences = [input_ids[int(row)] for row in example_rows]
    flat = np.fromiter((t for seq in sequences for t in seq), np.int32)
    seq_offsets = np.zeros(len(sequences) + 1, np.int32)
    np.cumsum([len(seq) for seq in sequences], out=seq_offsets[1:])
    columns = {
        "id": positions.column("id").combine_chunks().take(pa.array(starts)),
        "input_ids": pa.ListArray.from_arrays(pa.array(seq_offsets), pa.array(flat)),
    }
    if "decoder_input_ids" in schema.names:
        tokens = positions.column("token_id").combine_chunks().fill_null(0).to_numpy()
        decoder = np.empty(len(rows), np.int32)
        decoder[1:] = tokens[:-1]
        decoder[starts] = decoder_start
        columns["decoder_input_ids"] = pa.ListArray.from_arrays(offsets, pa.array(decoder))
    for name in positions.column_names[1:]:
        columns[name] = pa.ListArray.from_arrays(offsets, positions.column(name).combine_chunks())
    return pa.Table.from_pydict(columns, schema=schema)


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

    def _finish(self) -> dict:
        """Close, fsync and hash the temporary; its entry for the unit record."""
        faults.point("shard_close", self.tmp)
        self._writer.close()
        sha256, size = self._sink.close()
        file = layout.relative(self.out_dir, self.final)
        return {"file": file, "rows": self.rows, "bytes": size, "sha256": sha256}

    def _publish(self) -> str | None:
        return self._sink.publish()

    def commit(self, record: dict, check_lease: Callable[[], None]) -> dict:
        """`commit([self], ...)`: a unit with one shard."""
        return commit([self], record, check_lease)

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


def commit(shards: list[ShardWriter], record: dict, check_lease: Callable[[], None]) -> dict:
    """Close, fsync and hash a unit's shards, write its record, then make the shards visible
    under their names; `check_lease` raises if another job took the directory over. A failure
    discards every temporary. Returns the record."""
    first = shards[0]
    try:
        record = {"files": [shard._finish() for shard in shards], **record}
        faults.point("before_rename")
        check_lease()
        path = layout.record_path(first.out_dir, first.name)
        layout.write_json(path, record, first.out_dir)
        faults.point("between_record_and_shard")
        etags = [shard._publish() for shard in shards]
        if any(etags):  # S3 names the object it now holds: a rerun compares that, not bytes
            for entry, etag in zip(record["files"], etags, strict=True):
                entry["etag"] = etag
            layout.write_json(path, record, first.out_dir)
    except OSError as exc:
        for shard in shards:
            shard.abort()  # e.g. a full disk while closing: never rename a file that may be short
        raise output_error(getattr(exc, "filename", None) or first._where, exc) from None
    except BaseException:
        for shard in shards:
            shard.abort()
        raise
    return record
