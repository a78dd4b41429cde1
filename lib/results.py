"""Reading a finished output directory back into pandas, numpy and torch.

The data shards are `tokens/part-*.parquet` or `tokens/part-*.arrow` (the manifest's `format`,
else the files present); bookkeeping files start with `_` or `.` and are never read as data. Only committed shards are visible, so a
directory without `_SUCCESS` reads as the rows finished so far.

Null conventions in `load_arrays` (numpy has no nullable integers): `token_id` and `token_rank`
are -1 where the row has no next token, `token_logprob` is NaN there, and `has_token` says
which rows have one. Logit arrays keep their storage dtype (float16 or float32); scalar floats
are float32.

Top-k rows of every encoding read as `topk_ids` (N, k), `topk_logprobs` (N, k, float32) and
`topk_count` (N,): entries past a row's count (`output.top_p`) are -1 and -inf. Compact shards
(`output.encoding=compact`) are decoded shard by shard, each with the id order in its footer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lib import storage
from lib.errors import UserError
from lib.extract.corpus import as_ids, find_input_files, is_string
from lib.output import compact, layout
from lib.storage import AnyPath

# Top-k list columns of variable length (an export's: each row's kept entries) and their padding.
_RAGGED = {"topk_ids": -1, "topk_logprobs": -np.inf}
# Nullable columns and the value that stands for null in numpy.
_NULL_FILL = {"token_id": -1, "token_rank": -1, "token_logprob": float("nan")}
_LIST_COLUMNS = (
    "topk_ids",
    "topk_logits",
    "logits",
    "probe_logprobs",
    "logsumexp_t",
    "sample_ids",
    "sample_logprobs",
)
_COMPACT_COLUMNS = ("topk_id_codes", "topk_logprob_deltas")
_DECODED = ("topk_ids", "topk_logprobs", "topk_count")  # what the compact columns read as


def read_manifest(out_dir: str | AnyPath) -> dict | None:
    """The job's `_manifest.json` as written (JSON), or None while the job has not finished."""
    return layout.read_json(storage.location(out_dir) / layout.MANIFEST)


def output_format(out_dir: str | AnyPath, folder: str = layout.TOKENS) -> str:
    """`parquet` or `arrow`: the manifest says, else the shard files present do."""
    manifest = layout.read_manifest(storage.location(out_dir))
    if manifest is not None:
        return manifest.format
    shards = layout.shard_files(storage.location(out_dir), folder)
    present = {fmt for fmt in ("parquet", "arrow") if any(p.suffix == f".{fmt}" for p in shards)}
    if len(present) != 1:
        found = "both part-*.parquet and part-*.arrow" if present else "no part-* shards"
        raise UserError(f"{out_dir}: cannot tell the output format, found {found}")
    return present.pop()


def open_dataset(out_dir: str | AnyPath, folder: str = layout.TOKENS) -> ds.Dataset:
    """The shards of a folder (token rows by default) as one pyarrow dataset, in shard order
    (the order `pd.read_parquet` uses)."""
    fmt = output_format(out_dir, folder)
    shards = layout.listed_shards(storage.location(out_dir), folder)
    files, filesystem = storage.dataset_files([p for p in shards if p.suffix == f".{fmt}"])
    if not files:
        raise UserError(f"{out_dir}: no {folder}/part-*.{fmt} shards")
    return ds.dataset(files, format="ipc" if fmt == "arrow" else "parquet", filesystem=filesystem)


def load_table(out_dir: str | AnyPath, columns: list[str] | None = None) -> pa.Table:
    """All rows as one Arrow table, as stored (one row per position, or per example)."""
    return open_dataset(out_dir).to_table(columns=columns)


def positions_table(table: pa.Table) -> pa.Table:
    """Example rows as position rows (the default layout); position rows pass through."""
    if "input_ids" not in table.column_names:  # output.rows=positions already
        return table
    table = table.combine_chunks()
    lists = [
        name for name in table.column_names if name not in ("id", "input_ids", "decoder_input_ids")
    ]
    parents = pc.list_parent_indices(table.column(lists[0]))
    fields = [table.schema.field("id")]
    columns = [table.column("id").take(parents)]
    for name in lists:
        fields.append(pa.field(name, table.schema.field(name).type.value_type, name in _NULL_FILL))
        columns.append(pc.list_flatten(table.column(name)))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def load_frame(out_dir: str | AnyPath, columns: list[str] | None = None) -> pd.DataFrame:
    """All rows as a DataFrame, the same as `pd.read_parquet(out_dir)` gives for Parquet."""
    return load_table(out_dir, columns).to_pandas()


def load_documents(out_dir: str | AnyPath, columns: list[str] | None = None) -> pd.DataFrame:
    """One row per scored document (output.level documents or both), in input order; the same
    as `pd.read_parquet(OUT / "documents")` gives for Parquet."""
    return open_dataset(out_dir, layout.DOCUMENTS).to_table(columns=columns).to_pandas()


def document_arrays(
    out_dir: str | AnyPath, columns: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Document columns as numpy arrays: ids as in `load_arrays`, null floats as NaN and a
    null `n_bytes` (generate mode) as -1."""
    table = open_dataset(out_dir, layout.DOCUMENTS).to_table(columns=columns)
    out = {}
    for name in table.column_names:
        column = table.column(name)
        if name == "id":
            out[name] = _ids_to_numpy(column)
        elif pa.types.is_floating(column.type):
            out[name] = column.to_numpy()  # nulls become NaN
        elif column.null_count:  # n_bytes in generate mode: -1; a bool column: False
            fill = False if pa.types.is_boolean(column.type) else -1
            out[name] = column.fill_null(fill).to_numpy()
        else:
            out[name] = column.to_numpy()
    return out


def to_hf_dataset(out_dir: str | AnyPath, cache_dir: str | None = None):
    """The shards as a Hugging Face `datasets.Dataset` with torch formatting.

    Arrow output is memory-mapped in place (no copy); Parquet output is decoded once into the
    datasets cache (`cache_dir`, default datasets' own), which it then memory-maps. Output on an
    object store is read into memory. With `output.rows=examples` each row is one input row,
    ready for a DataLoader.
    """
    import datasets

    fmt = output_format(out_dir)
    shards = [p for p in layout.listed_shards(storage.location(out_dir)) if p.suffix == f".{fmt}"]
    if not shards:
        raise UserError(f"{out_dir}: no shards to read")
    if storage.is_remote(shards[0]):
        table = open_dataset(out_dir).to_table()
        return datasets.Dataset(datasets.table.InMemoryTable(table)).with_format("torch")
    files = [str(p) for p in shards]
    if fmt == "arrow":
        tables = [pa.ipc.open_file(pa.memory_map(path)).read_all() for path in files]
        dataset = datasets.Dataset(datasets.table.InMemoryTable(pa.concat_tables(tables)))
    else:
        dataset = datasets.Dataset.from_parquet(files, cache_dir=cache_dir)
    return dataset.with_format("torch")


def _ids_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """int64 ids as they are; string ids as a fixed-width numpy str array built per example."""
    if not is_string(column.type):
        return column.to_numpy()
    # One Python string per distinct id (an example), not per row; rows index into them.
    encoded = pc.dictionary_encode(column).combine_chunks()
    names = np.asarray(encoded.dictionary.to_pylist(), dtype=str)
    return names[encoded.indices.to_numpy()]


def _fixed_list_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """(N, width) array from a fixed-size list column by flattening each chunk's child array."""
    width = column.type.list_size
    value_type = column.type.value_type.to_pandas_dtype()
    parts = [chunk.flatten().to_numpy().reshape(-1, width) for chunk in column.chunks]
    if not parts:
        return np.empty((0, width), dtype=value_type)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _ragged_to_numpy(
    column: pa.ChunkedArray, fill: float, k: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) from a list column of each row's kept entries, padded with `fill`, and the
    counts; `k` defaults to the longest row."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy().astype(np.int64)
    counts = np.diff(offsets).astype(np.int32)
    width = int(counts.max(initial=0)) if k is None else k
    values = array.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    out = np.full((len(counts), width), fill, dtype=values.dtype)
    row = np.repeat(np.arange(len(counts)), counts)
    out[row, np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], counts)] = values
    return out, counts


def table_to_arrays(
    table: pa.Table, id_order: np.ndarray | None = None, k: int | None = None
) -> dict[str, np.ndarray]:
    """Output rows as numpy arrays, with no per-row Python objects (see the module docstring).

    Compact rows need their shard's `id_order` (see `shard_id_order`) to decode `topk_ids`, and
    are `k` wide (default: their longest row)."""
    arrays = {}
    for name in table.column_names:
        column = table.column(name)
        if name in _COMPACT_COLUMNS:
            continue
        if name == "id":
            arrays[name] = _ids_to_numpy(column)
        elif name in _RAGGED and not pa.types.is_fixed_size_list(column.type):
            arrays[name], arrays["topk_count"] = _ragged_to_numpy(column, _RAGGED[name], k)
        elif name in _LIST_COLUMNS:
            arrays[name] = _fixed_list_to_numpy(column)
        elif name in _NULL_FILL:
            if name == "token_id":
                arrays["has_token"] = pc.is_valid(column).to_numpy(zero_copy_only=False)
            filled = pc.fill_null(column, pa.scalar(_NULL_FILL[name], column.type))
            arrays[name] = filled.to_numpy()
        else:
            arrays[name] = column.to_numpy()
        if arrays[name].dtype == np.float16 and name not in _LIST_COLUMNS:
            arrays[name] = arrays[name].astype(
                np.float32
            )  # compact's entropy (and token_logprob of code version 1)
    if "topk_logprob_deltas" in table.column_names:
        codes = table.column("topk_id_codes") if "topk_id_codes" in table.column_names else None
        arrays |= compact.decode(codes, table.column("topk_logprob_deltas"), id_order, k)
    elif "topk_ids" in arrays and "topk_count" not in arrays:
        arrays["topk_count"] = (arrays["topk_ids"] >= 0).sum(axis=1, dtype=np.int32)
        if "topk_logits" in arrays and "logsumexp" in arrays:
            arrays["topk_logprobs"] = topk_logprobs(arrays["topk_logits"], arrays["logsumexp"])
    return arrays


def shard_id_order(fragment: ds.Fragment) -> np.ndarray | None:
    """The id order in a compact Parquet shard's footer; None where it has none."""
    footer = fragment.metadata.metadata if isinstance(fragment, ds.ParquetFileFragment) else None
    text = (footer or {}).get(compact.ID_ORDER_KEY.encode())
    return None if text is None else compact.unpack_id_order(text)


def _stored_columns(columns: list[str] | None) -> list[str] | None:
    """The compact columns to read for the decoded names among `columns`."""
    if columns is None:
        return None
    wanted = [name for name in columns if name not in _DECODED]
    return wanted + list(_COMPACT_COLUMNS) if len(wanted) < len(columns) else wanted


def _topk_width(out_dir: str | AnyPath) -> int | None:
    """`output.k` from the manifest; None while the job has not finished."""
    manifest = layout.read_manifest(storage.location(out_dir))
    return manifest.config.output.k if manifest else None


def _concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Shards' arrays end to end; (n, k) top-k arrays padded to the widest (-1, -inf)."""
    out = {}
    for name in parts[0]:
        values = [part[name] for part in parts]
        if name in ("topk_ids", "topk_logprobs"):
            width = max(v.shape[1] for v in values)
            fill = -1 if name == "topk_ids" else -np.inf
            values = [
                np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=fill) for v in values
            ]
        out[name] = np.concatenate(values)
    return out


def load_arrays(out_dir: str | AnyPath, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """All rows as numpy arrays: 1-D per scalar column, (N, k) or (N, V) per list column."""
    dataset = open_dataset(out_dir)
    if "topk_logprob_deltas" not in dataset.schema.names:
        table = positions_table(dataset.to_table(columns=columns))
        return table_to_arrays(table, k=_topk_width(out_dir))
    k, stored = _topk_width(out_dir), _stored_columns(columns)
    parts = [
        table_to_arrays(fragment.to_table(columns=stored), shard_id_order(fragment), k)
        for fragment in dataset.get_fragments()
    ]
    return _concatenate(parts)


def iter_examples(out_dir: str | AnyPath) -> Iterator[tuple[object, dict[str, np.ndarray]]]:
    """Yield (id, arrays of that example's rows sorted by position), one shard in memory at a time.

    Every input row lands in exactly one shard, so grouping shard by shard is complete. Within a
    shard, examples come in order of first appearance: input order in top-k mode.
    """
    k = _topk_width(out_dir)
    for fragment in open_dataset(out_dir).get_fragments():
        table = positions_table(fragment.to_table())
        if table.num_rows == 0:
            continue
        # Codes in order of first appearance; sorting by (code, position) groups each example.
        codes = pc.dictionary_encode(table.column("id")).combine_chunks()
        ids = codes.dictionary.to_pylist()
        arrays = table_to_arrays(table.drop_columns(["id"]), shard_id_order(fragment), k)
        order = np.lexsort((arrays["position"], codes.indices.to_numpy()))
        arrays = {name: values[order] for name, values in arrays.items()}
        sorted_codes = codes.indices.to_numpy()[order]
        starts = np.flatnonzero(np.diff(sorted_codes, prepend=-1))
        stops = np.append(starts[1:], len(sorted_codes))
        for start, stop in zip(starts, stops, strict=True):
            yield (
                ids[sorted_codes[start]],
                {name: values[start:stop] for name, values in arrays.items()},
            )


def topk_logprobs(topk_logits, logsumexp):
    """Exact log-probabilities of the top-k entries: logits minus the full-vocabulary logsumexp.

    Works on numpy arrays or torch tensors, (N, k) and (N,), and computes in float32.
    """
    if isinstance(topk_logits, np.ndarray):
        return topk_logits.astype(np.float32) - np.asarray(logsumexp, dtype=np.float32)[..., None]
    return topk_logits.float() - logsumexp.float().unsqueeze(-1)


def to_torch(source: str | AnyPath | dict[str, np.ndarray]) -> dict:
    """Tensors for a distillation loss from an output directory or `load_arrays` output.

    `topk_ids` and `token_id` are int64 (-1 where `token_mask` is False, or past a row's
    `topk_count`), logits and `logsumexp` float32, `topk_logprobs` the top-k log-probabilities
    (-inf past the count; exact in plain rows, within 0.0096 nats in compact ones). String ids
    have no tensor form and are left out; integer ids come as int64 `id`.
    """
    import torch

    arrays = source if isinstance(source, dict) else load_arrays(source)
    out = {}
    if "id" in arrays and arrays["id"].dtype.kind in "iu":
        out["id"] = torch.from_numpy(arrays["id"].astype(np.int64))
    for name in ("position", "token_id", "token_rank", "topk_ids", "topk_count", "sample_ids"):
        if name in arrays:
            out[name] = torch.from_numpy(arrays[name].astype(np.int64))
    floats = ("token_logprob", "logsumexp", "entropy", "topk_logits", "topk_logprobs", "logits")
    teacher = ("probe_logprobs", "logsumexp_t", "sample_logprobs")
    for name in floats + teacher:
        if name in arrays:
            out[name] = torch.from_numpy(arrays[name].astype(np.float32))
    if "has_token" in arrays:
        out["token_mask"] = torch.from_numpy(arrays["has_token"].astype(bool))
    if "topk_logprobs" not in out and "topk_logits" in out and "logsumexp" in out:
        out["topk_logprobs"] = topk_logprobs(out["topk_logits"], out["logsumexp"])
    return out


def input_frame(
    input_path: str, id_column: str | None = None, columns: list[str] | None = None
) -> pd.DataFrame:
    """The input corpus with the job's `id` column: `id_column` values, else the global row index.

    The row index counts rows over the input files in sorted path order, as the job does.
    """
    wanted = columns
    if columns is not None and id_column is not None:
        wanted = list(dict.fromkeys([*columns, id_column]))
    tables = [
        pq.ParquetFile(storage.open_input(path)).read(columns=wanted)
        for path in find_input_files(input_path)
    ]
    table = pa.concat_tables(tables, promote_options="permissive")
    if id_column is None:
        ids = pa.array(np.arange(table.num_rows, dtype=np.int64))
    else:
        ids = table.column(id_column)
        ids = as_ids(ids, input_path, id_column)
        if columns is not None and id_column not in columns:
            table = table.drop_columns([id_column])
    if "id" in table.column_names:
        table = table.drop_columns(["id"])
    return table.add_column(0, "id", ids).to_pandas()


def join_input(
    out_dir: str | AnyPath,
    input_path: str | None = None,
    id_column: str | None = None,
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """Result rows with the input columns of their example, matched by id (result row order kept).

    `input_path` and `id_column` default to the job's own (from the manifest); `columns` are the
    input columns to attach, by default the text column (and the target column if the job had one).
    """
    manifest = layout.read_manifest(storage.location(out_dir))
    job_input = manifest.config.input if manifest else None
    if input_path is None:
        if job_input is None:
            raise UserError(f"{out_dir}: no _manifest.json, so pass input_path (and id_column)")
        input_path = job_input.path
    if job_input is not None:
        id_column = id_column or job_input.id_column
    if columns is None:
        columns = [job_input.text_column if job_input else "text"]
        if job_input is not None and job_input.messages_column:
            columns = [job_input.messages_column]
        if job_input is not None and job_input.target_column:
            columns.append(job_input.target_column)
    inputs = input_frame(input_path, id_column, columns)
    return load_frame(out_dir).merge(inputs, on="id", how="left", validate="many_to_one")
