"""What a unit's per-position arrays become: the schemas and Arrow tables of each kind of row,
and the output kinds, decided once at plan time from the config.

- `TokenRows`: one row per scored position (or per input row, `output.rows=examples`) with its
  top-k; a unit's arrays are held until it ends and written in input order.
- `StreamedTokenRows`: the same rows with full logits, written batch by batch (a unit of full
  logits never sits in memory); the unit keeps only what its scores need.
- `DocumentRows`: one row per scored input row, with its scores, written when the unit ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lib.config import JobConfig, OutputConfig
from lib.extract.stages import Unit
from lib.output import compact, layout
from lib.output.writer import ShardWriter

# What the document rows and corpus scores need of each position (kept in full mode too).
SCORE_FIELDS = (
    "row",
    "position",
    "has_token",
    "token_logprob",
    "token_rank",
    "entropy",
    "top1_logprob",
    "logprob_std",
)


# The teacher columns (output.probes, output.temperatures, output.samples): fixed-size lists,
# stored as computed in every encoding.
TEACHER_COLUMNS = {
    "probe_logprobs": pa.float32(),
    "logsumexp_t": pa.float32(),
    "sample_ids": pa.int32(),
    "sample_logprobs": pa.float32(),
}


def teacher_fields(output: OutputConfig) -> list[pa.Field]:
    """The teacher columns an output config asks for, each as wide as its list of values."""
    widths = (len(output.probes), len(output.temperatures), output.samples, output.samples)
    return [
        pa.field(name, pa.list_(tp, width), nullable=False)
        for (name, tp), width in zip(TEACHER_COLUMNS.items(), widths, strict=True)
        if width
    ]


# -- schemas and tables ---------------------------------------------------------------------
def position_fields(id_type: pa.DataType, entropy_type: pa.DataType) -> list[pa.Field]:
    """The columns every token row starts with, before its top-k or logits."""
    return [
        pa.field("id", id_type, nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32()),
        pa.field("token_logprob", pa.float32()),
        pa.field("token_rank", pa.int32()),
        pa.field("logsumexp", pa.float32(), nullable=False),
        pa.field("entropy", entropy_type, nullable=False),
    ]


def output_schema(
    id_type: pa.DataType,
    k: int,
    vocab_size: int,
    logits_dtype: str,
    *,
    full: bool,
    encoding: str = "plain",
    teacher: list[pa.Field] = (),
) -> pa.Schema:
    """One row per scored position; top-k columns, or a `logits` column in full mode, then the
    `teacher` columns (`teacher_fields`).

    `encoding="compact"` stores the top-k as `lib.output.compact` codes, the token log-probability on
    a 1/64-nat grid and the entropy as float16."""
    value_type = pa.float16() if logits_dtype == "float16" else pa.float32()
    fields = position_fields(id_type, pa.float16() if encoding == "compact" else pa.float32())
    if encoding == "compact":
        fields.append(pa.field("topk_id_codes", compact.CODE_TYPE, nullable=False))
        fields.append(pa.field("topk_logprob_deltas", compact.CODE_TYPE, nullable=False))
    elif full:
        fields.append(pa.field("logits", pa.list_(value_type, vocab_size), nullable=False))
    else:
        fields.append(pa.field("topk_ids", pa.list_(pa.int32(), k), nullable=False))
        fields.append(pa.field("topk_logits", pa.list_(value_type, k), nullable=False))
    return pa.schema([*fields, *teacher])


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
    for name in TEACHER_COLUMNS:
        if name in schema.names:
            columns[name] = _fixed_list(stats[name], schema.field(name).type.value_type)
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


def documents_schema(id_type: pa.DataType) -> pa.Schema:
    """One row per scored input row."""
    f64 = pa.float64()
    return pa.schema(
        [
            pa.field("id", id_type, nullable=False),
            pa.field("n_tokens", pa.int32(), nullable=False),
            pa.field("truncated", pa.bool_(), nullable=False),
            pa.field("n_bytes", pa.int64()),
            pa.field("sum_logprob", f64, nullable=False),
            pa.field("mean_logprob", f64),
            pa.field("perplexity", f64),
            pa.field("bits_per_byte", f64),
            pa.field("mean_entropy", f64),
            pa.field("top1_accuracy", f64),
            pa.field("min_k_logprob", f64),
            pa.field("min_k_plus_plus", f64),
        ]
    )


def documents_table(
    schema: pa.Schema, ids: pa.Array, scored_rows: np.ndarray, columns: dict[str, np.ndarray]
) -> pa.Table:
    """Arrow rows from `document_columns`; NaN becomes null, a missing column all null."""
    data = {"id": ids.take(pa.array(scored_rows))}
    for field in schema:
        if field.name == "id":
            continue
        values = columns.get(field.name)
        if values is None:
            data[field.name] = pa.nulls(len(scored_rows), field.type)
        elif pa.types.is_floating(field.type):
            data[field.name] = pa.array(values, field.type, mask=np.isnan(values))
        else:
            data[field.name] = pa.array(values, field.type)
    return pa.Table.from_pydict(data, schema=schema)


# -- the output kinds -----------------------------------------------------------------------
Shard = Callable[[], ShardWriter]  # the unit's shard of a kind, opened on first use


def _positions_or_examples(
    arrays: dict[str, np.ndarray],
    unit: Unit,
    schema: pa.Schema,
    shard_schema: pa.Schema,
    decoder_start: int | None,
) -> pa.Table:
    """Shard rows from sorted arrays: position rows, or example rows built from them."""
    arrays = dict(arrays)
    row, position = arrays.pop("row"), arrays.pop("position")
    token_id = arrays.pop("token_id")
    table = to_table(schema, unit.ids, row, position, token_id, arrays)
    if shard_schema is schema:
        return table
    return to_examples(shard_schema, table, row, unit.input_ids, decoder_start)


def by_position(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays in input order: by row, then position (numpy is faster than an Arrow take)."""
    order = np.lexsort((arrays["position"], arrays["row"]))
    return {name: values[order] for name, values in arrays.items()}


@dataclass(frozen=True)
class TokenRows:
    """Top-k token rows: held for the unit, written at its end in input order."""

    schema: pa.Schema  # position rows, as the reduction gives them
    shard_schema: pa.Schema  # what the shards hold: position rows or example rows
    decoder_start: int | None
    folder: str = layout.TOKENS

    def batch(self, shard: Shard, arrays: dict[str, np.ndarray], unit: Unit) -> None:
        """Nothing yet: the unit's rows are written in order when it ends."""

    def end(self, shard: Shard, arrays: dict[str, np.ndarray], columns: dict, unit: Unit) -> None:
        if len(arrays["position"]):
            table = _positions_or_examples(
                arrays, unit, self.schema, self.shard_schema, self.decoder_start
            )
            shard().write(table)


@dataclass(frozen=True)
class StreamedTokenRows:
    """Full-logit token rows: each batch written as it comes."""

    schema: pa.Schema
    shard_schema: pa.Schema
    decoder_start: int | None
    folder: str = layout.TOKENS

    def batch(self, shard: Shard, arrays: dict[str, np.ndarray], unit: Unit) -> None:
        if self.shard_schema is not self.schema:  # a row's positions are all in one batch
            arrays = by_position(arrays)
        shard().write(
            _positions_or_examples(arrays, unit, self.schema, self.shard_schema, self.decoder_start)
        )

    def end(self, shard: Shard, arrays: dict[str, np.ndarray], columns: dict, unit: Unit) -> None:
        """Every row is written already."""


@dataclass(frozen=True)
class DocumentRows:
    """One row per scored input row, written when the unit ends."""

    schema: pa.Schema
    folder: str = layout.DOCUMENTS

    def batch(self, shard: Shard, arrays: dict[str, np.ndarray], unit: Unit) -> None:
        """Nothing yet: a document's scores need all its positions."""

    def end(self, shard: Shard, arrays: dict[str, np.ndarray], columns: dict, unit: Unit) -> None:
        shard().write(documents_table(self.schema, unit.ids, unit.scored_rows, columns))


Kind = TokenRows | StreamedTokenRows | DocumentRows


@dataclass(frozen=True)
class Outputs:
    """What each unit writes, decided once: its kinds of rows (one shard each, in the order
    its record lists them) and what it holds until it ends."""

    kinds: tuple[Kind, ...]
    streamed: bool  # full logits: the unit holds only SCORE_FIELDS, and the writer one batch
    topk: bool  # top-k token rows: the record counts the stored entries
    token_schema: pa.Schema  # the token shards' (the manifest records it at every level)
    documents_schema: pa.Schema | None  # the document shards', where they are written

    def held(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What a unit holds of a batch's arrays until it ends."""
        if not self.streamed:
            return arrays
        return {name: arrays[name] for name in SCORE_FIELDS if name in arrays}


def plan_outputs(
    config: JobConfig,
    id_type: pa.DataType,
    vocab_size: int,
    *,
    seq2seq: bool,
    decoder_start: int | None,
) -> Outputs:
    """The output kinds a config asks for."""
    out = config.output
    full = out.logits == "full"
    schema = output_schema(
        id_type,
        out.k,
        vocab_size,
        out.dtype,
        full=full,
        encoding=out.encoding,
        teacher=teacher_fields(out),
    )
    shard_schema = examples_schema(schema, seq2seq) if out.rows == "examples" else schema
    kinds: list[Kind] = []
    if out.level != "documents":
        kind = StreamedTokenRows if full else TokenRows
        kinds.append(kind(schema, shard_schema, decoder_start))
    documents = documents_schema(id_type) if out.level != "tokens" else None
    if documents is not None:
        kinds.append(DocumentRows(documents))
    tokens = out.level != "documents"
    return Outputs(tuple(kinds), full and tokens, not full and tokens, shard_schema, documents)
