"""`logit-extract export OUT DEST`: a plain-encoded copy of a finished top-k output.

Compact shards store the top-k as codes that only lib.results decodes (the ids need the
shard's id order in its footer); top-p rows pad the top-k with -1 and -inf. The export writes
the same layout with every token row's kept entries as two ordinary list columns,
`topk_ids` (list<int32>) and `topk_logprobs` (list<float32>, log-probabilities: the logits
minus `logsumexp`), and the other columns as lib.results reads them (`entropy` float32).
`pd.read_parquet(DEST / "tokens")`, DuckDB and Polars then see the top-k as plain lists, and
`results.load_arrays(DEST)` equals `results.load_arrays(OUT)`. Document rows and skipped rows are
copied; the manifest is the source's with the new shards, and `logit-extract verify` reads it.
Shards are read and written one record batch at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lib import results, storage
from lib.errors import UserError, output_error
from lib.output import compact, layout, rows, writer
from lib.output.records import Manifest, ShardEntry
from lib.storage import AnyPath

BATCH_ROWS = 65536  # positions decoded and written at a time
_COPY_BLOCK = 8 << 20


def export_schema(id_type: pa.DataType, teacher: list[pa.Field] = ()) -> pa.Schema:
    """Token rows with the top-k as two list columns of each row's kept entries, then the
    source's teacher columns (probes, temperatures, samples) as they are."""
    return pa.schema(
        [
            *rows.position_fields(id_type, pa.float32()),
            pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_logprobs", pa.list_(pa.float32()), nullable=False),
            *teacher,
        ]
    )


def _refuse(source: AnyPath, manifest: Manifest | None, dest: AnyPath) -> None:
    """One line for what cannot be exported, or to where."""
    if manifest is None or not (source / layout.SUCCESS).exists():
        raise UserError(f"{source}: no finished output (no valid _manifest.json or _SUCCESS)")
    output = manifest.config.output
    why = None
    if output.level == "documents":
        why = "it has no token rows (output.level=documents)"
    elif output.logits == "full":
        why = "its token rows hold full logits, plain already"
    elif output.rows == "examples":
        why = "it holds one row per example (output.rows=examples); export writes position rows"
    if why:
        raise UserError(f"{source}: nothing to export: {why}")
    if dest == source or storage.location(str(dest)).resolve() == source.resolve():
        raise UserError(f"export destination {dest} is the output itself; choose another")
    if dest.exists() and (not dest.is_dir() or any(True for _ in dest.iterdir())):
        raise UserError(f"export destination {dest} exists and is not empty; choose a new one")


def _table(arrays: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Export rows from lib.results arrays (padded (N, k) top-k and its counts)."""
    counts = arrays["topk_count"].astype(np.int64)
    kept = np.arange(arrays["topk_ids"].shape[1]) < counts[:, None]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    no_token = ~arrays["has_token"]
    ids = arrays["id"]
    columns = {
        "id": pa.array(ids if ids.dtype.kind != "U" else ids.tolist(), schema.field("id").type),
        "position": pa.array(arrays["position"], pa.int32()),
        "token_id": pa.array(arrays["token_id"].astype(np.int32), mask=no_token),
        "token_logprob": pa.array(arrays["token_logprob"].astype(np.float32), mask=no_token),
        "token_rank": pa.array(arrays["token_rank"].astype(np.int32), mask=no_token),
        "logsumexp": pa.array(arrays["logsumexp"].astype(np.float32)),
        "entropy": pa.array(arrays["entropy"].astype(np.float32)),
        "topk_ids": pa.ListArray.from_arrays(
            offsets, pa.array(arrays["topk_ids"][kept].astype(np.int32))
        ),
        "topk_logprobs": pa.ListArray.from_arrays(
            offsets, pa.array(arrays["topk_logprobs"][kept].astype(np.float32))
        ),
    }
    for field in schema:
        if field.name in rows.TEACHER_COLUMNS:
            values = arrays[field.name]
            flat = pa.array(values.reshape(-1), field.type.value_type)
            columns[field.name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    return pa.Table.from_pydict(columns, schema=schema)


def _batches(path: AnyPath, fmt: str) -> tuple[Iterator[pa.RecordBatch], np.ndarray | None]:
    """A shard's record batches, and its id order (compact shards' footer)."""
    if fmt == "arrow":
        reader = pa.ipc.open_file(storage.open_mapped(path))
        return (reader.get_batch(i) for i in range(reader.num_record_batches)), None
    parquet = pq.ParquetFile(storage.open_input(path))
    order = (parquet.metadata.metadata or {}).get(compact.ID_ORDER_KEY.encode())
    id_order = compact.unpack_id_order(order) if order else None
    return parquet.iter_batches(batch_size=BATCH_ROWS), id_order


def _export_shard(
    source: AnyPath, dest: AnyPath, name: str, schema: pa.Schema, manifest: Manifest
) -> ShardEntry:
    """One token shard, decoded batch by batch into export rows (in the source's format)."""
    fmt, k = manifest.format, manifest.config.output.k
    batches, id_order = _batches(source / name, fmt)
    unit = name.split("/", 1)[1].rsplit(".", 1)[0]
    shard = writer.ShardWriter(dest, unit, schema, fmt)
    try:
        for batch in batches:
            arrays = results.table_to_arrays(pa.Table.from_batches([batch]), id_order, k)
            shard.write(_table(arrays, schema))
    except BaseException:
        shard.abort()
        raise
    return writer.publish(shard)


def _copy(source: AnyPath, dest: AnyPath, out_dir: AnyPath) -> None:
    """A file copied whole, visible at `dest` only once complete."""
    sink = storage.Sink(dest, layout.temp_path(out_dir, dest))
    try:
        with storage.open_stream(source) as handle:
            while block := handle.read(_COPY_BLOCK):
                sink.file.write(block)
        sink.close()
        sink.publish()
    except OSError as exc:
        sink.abort()
        raise output_error(dest, exc) from None
    except BaseException:
        sink.abort()
        raise


def export(out_dir: str | AnyPath, dest_dir: str | AnyPath) -> Manifest:
    """Write the plain-encoded copy of `out_dir` at `dest_dir`; its manifest."""
    source, dest = storage.location(out_dir), storage.location(dest_dir)
    manifest = layout.read_manifest(source)
    _refuse(source, manifest, dest)
    id_type = pa.string() if "string" in manifest.schema[0]["type"] else pa.int64()
    schema = export_schema(id_type, rows.teacher_fields(manifest.config.output))
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for folder in (layout.TOKENS, layout.DOCUMENTS, layout.SKIPPED_DIR, layout.TMP):
            (dest / folder).mkdir(exist_ok=True)
    except OSError as exc:
        raise output_error(dest, exc) from None
    shards = []
    for entry in manifest.shards:
        if entry.file.startswith(f"{layout.TOKENS}/"):
            written = _export_shard(source, dest, entry.file, schema, manifest)
        else:
            _copy(source / entry.file, dest / entry.file, dest)
            written = dataclasses.replace(entry, etag=None)
        shards.append(dataclasses.replace(written, rank=entry.rank))
    _copy(layout.skipped_path(source), dest / layout.SKIPPED, dest)
    config = dataclasses.replace(
        manifest.config, output=dataclasses.replace(manifest.config.output, encoding="plain")
    )
    exported = dataclasses.replace(
        manifest,
        config=config,
        schema=[{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
        shards=shards,
        exported_from=str(source),
    )
    layout.write_json(dest / layout.MANIFEST, exported.to_json(), dest)
    layout.write_atomic(dest / layout.SUCCESS, b"", dest)
    layout.remove_own_temporaries(dest)
    return exported
