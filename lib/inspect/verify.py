"""Check a finished output directory: every shard matches the checksum the job recorded and
decodes in full, agrees with the manifest, holds no row twice; no temporary file is left; and
(given the input) every input id is scored or skipped, exactly once.

Shards are read one record batch at a time and only `id` and `position` are kept, so memory grows
with the number of input rows, not with the number of output rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lib import storage
from lib.errors import UserError, first_line
from lib.extract import corpus, pins
from lib.output import layout
from lib.output.records import Manifest, ShardEntry, Totals
from lib.storage import AnyPath

EXAMPLES = 3  # ids quoted in a problem line


@dataclass
class Report:
    problems: list[str]
    warnings: list[str] = field(default_factory=list)  # nothing wrong with the data
    shards: int = 0
    output_rows: int = 0  # token rows
    document_rows: int | None = None  # at output.level documents or both
    input_rows: int | None = None  # set when the input was checked
    storage: StorageFigures | None = None  # compact or top_p position rows


def _examples(values: pa.Array) -> str:
    return ", ".join(repr(v) for v in values.slice(0, EXAMPLES).to_pylist())


def _type_text(text: str) -> str:
    """A type's text without list child names, which Parquet renames (`item` -> `element`)."""
    return re.sub(r"<\w+: ", "<", text)


def _schema_difference(actual: pa.Schema, expected: list[dict]) -> str | None:
    """The first difference between a shard's schema and the manifest's, None when they agree."""
    got = [(f.name, _type_text(str(f.type)), f.nullable) for f in actual]
    want = [(f["name"], _type_text(f["type"]), f["nullable"]) for f in expected]
    if [g[0] for g in got] != [w[0] for w in want]:
        names = ", ".join(g[0] for g in got)
        return f"columns {names}; the manifest has {', '.join(w[0] for w in want)}"
    for (name, tp, nullable), (_, want_tp, want_nullable) in zip(got, want, strict=True):
        if tp != want_tp or nullable != want_nullable:
            return (
                f"column {name} is {tp}{'' if nullable else ' not null'}, the manifest says "
                f"{want_tp}{'' if want_nullable else ' not null'}"
            )
    return None


def _read_keys(path: AnyPath, fmt: str) -> tuple[pa.Schema, pa.Table]:
    """A shard's schema and its (id, position) columns, after decoding and validating every
    column of every batch; raises on an unreadable file."""
    if fmt == "arrow":
        reader = pa.ipc.open_file(storage.open_mapped(path))
        schema = reader.schema
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        expected_rows = None
    else:
        parquet = pq.ParquetFile(storage.open_input(path))
        schema = parquet.schema_arrow
        batches = parquet.iter_batches(batch_size=8192)
        expected_rows = parquet.metadata.num_rows
    document_rows = "n_tokens" in schema.names
    required = ("id",) if document_rows else ("id", "position")
    missing = [name for name in required if name not in schema.names]
    if missing:
        raise ValueError(f"no {' or '.join(missing)} column")
    # One row per document or per example (output.rows=examples) has one key, the id; token
    # rows have two, (id, position).
    one_key = document_rows or pa.types.is_list(schema.field("position").type)
    names = ["id"] if one_key else ["id", "position"]
    keys = []
    for batch in batches:
        batch.validate(full=True)
        keys.append(batch.select(names))
    key_schema = pa.schema([schema.field(name) for name in names])
    table = pa.Table.from_batches(keys, key_schema)
    if expected_rows is not None and table.num_rows != expected_rows:
        raise ValueError(f"footer says {expected_rows} rows, the columns hold {table.num_rows}")
    return schema, table


def _checksum_problem(path: AnyPath, entry: ShardEntry) -> str | None:
    """How a shard differs from the size and sha256 its manifest entry recorded, if it does."""
    sha256, size = storage.sha256(path)
    if size != entry.bytes:
        return f"has {size:,} bytes, the job committed {entry.bytes:,}"
    if sha256 != entry.sha256:
        return "does not match its checksum (damaged or changed after it was committed)"
    return None


def _check_keys(
    name: str, schema: pa.Schema, keys: pa.Table, expected: list, rows: int | None, problems: list
) -> None:
    """One shard's schema, row count and keys against the manifest."""
    difference = _schema_difference(schema, expected)
    if difference:
        problems.append(f"shard {name}: schema differs from the manifest: {difference}")
    if rows is not None and rows != keys.num_rows:
        problems.append(f"shard {name} has {keys.num_rows} rows, the manifest says {rows}")
    counts = keys.group_by(keys.column_names).aggregate([([], "count_all")])
    if counts.num_rows != keys.num_rows:
        repeated = counts.filter(pc.greater(counts["count_all"], 1))
        extra = keys.num_rows - counts.num_rows
        where = "".join(f" {key} {repeated[key][0].as_py()!r}" for key in keys.column_names)
        problems.append(
            f"shard {name} has {extra} duplicate ({', '.join(keys.column_names)}) rows, e.g.{where}"
        )


def _folders(manifest: Manifest) -> tuple[str, ...]:
    return layout.folders(manifest.config.output.level)


def _check_shards(
    out_dir: AnyPath, manifest: Manifest, problems: list[str]
) -> tuple[pa.Array, dict[str, int], bool]:
    """Check every shard, folder by folder, against the manifest.

    Returns the distinct ids of the first folder's rows, the rows of each folder's shards and
    whether every listed shard was read.
    """
    entries = {s.file: s for s in manifest.shards}
    if len(entries) != len(manifest.shards):
        problems.append("the manifest lists a shard more than once")
    folders = _folders(manifest)
    on_disk = layout.data_entries(out_dir, manifest.config.output.level)
    for name in sorted(set(entries) - set(on_disk)):
        problems.append(f"shard {name} is listed in the manifest but missing")
    for name in sorted(set(on_disk) - set(entries)):
        problems.append(f"{name} is not listed in the manifest (readers would read it as rows)")
    results = []
    for folder in folders:
        schema = manifest.documents_schema if folder == layout.DOCUMENTS else None
        mine = [n for n in on_disk if n.startswith(f"{folder}/")]
        results.append(
            _check_folder(out_dir, mine, entries, schema or manifest.schema, manifest, problems)
        )
    rows = {folder: r[1] for folder, r in zip(folders, results, strict=True)}
    all_read = all(r[2] for r in results) and set(entries) <= set(on_disk)
    return results[0][0], rows, all_read


def _check_folder(
    out_dir: AnyPath,
    names: list[str],
    entries: dict[str, ShardEntry],
    schema: list,
    manifest: Manifest,
    problems: list,
) -> tuple[pa.Array, int, bool]:
    """One folder's shards: checksums, schema, rows and keys, and no id in two shards."""
    fmt = manifest.format
    unique_ids, owners, readable, rows = [], [], [], 0
    for name in names:
        fmt_here = (
            "arrow" if name.endswith(".arrow") else "parquet" if name.endswith(".parquet") else fmt
        )
        entry = entries.get(name)
        try:
            damage = _checksum_problem(out_dir / name, entry) if entry else None
            if damage:
                problems.append(f"shard {name} {damage}")
            shard_schema, keys = _read_keys(out_dir / name, fmt_here)
        except Exception as exc:  # any failure to read is the finding, whatever pyarrow raises
            problems.append(f"shard {name} is not readable: {first_line(exc)}")
            continue
        rows += keys.num_rows
        _check_keys(name, shard_schema, keys, schema, entry and entry.rows, problems)
        ids = pc.unique(keys.column("id").combine_chunks())
        unique_ids.append(ids)
        owners.append(np.full(len(ids), len(readable), dtype=np.int64))
        readable.append(name)
    all_read = len(readable) == len(names)
    if not unique_ids:
        return pa.array([], pa.string()), rows, all_read
    all_ids = pa.concat_arrays(unique_ids)
    # Each input row belongs to one unit, so an id in two shards is a duplicated row.
    counts = pc.value_counts(all_ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0]
        where = np.concatenate(owners)[pc.equal(all_ids, first).to_numpy(zero_copy_only=False)]
        problems.append(
            f"{len(repeated)} ids have rows in more than one shard, e.g. {first.as_py()!r} in "
            f"{', '.join(readable[i] for i in where)}"
        )
    return counts.field("values"), rows, all_read


def _footer_entries(path: AnyPath) -> int:
    """Stored top-k entries of a compact shard, from its footer: its lists are never empty, so
    the log-probability column holds one value per entry."""
    metadata = pq.ParquetFile(storage.open_input(path)).metadata
    paths = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    leaf = paths.index("topk_logprob_deltas.list.element")
    return sum(
        metadata.row_group(i).column(leaf).num_values for i in range(metadata.num_row_groups)
    )


@dataclass(frozen=True)
class StorageFigures:
    """What the token shards' top-k costs: bytes per position and per stored entry."""

    bytes: int
    positions: int
    entries: int

    @property
    def bytes_per_position(self) -> float:
        return self.bytes / max(self.positions, 1)

    @property
    def bytes_per_entry(self) -> float:
        return self.bytes / max(self.entries, 1)

    @property
    def entries_per_position(self) -> float:
        return self.entries / max(self.positions, 1)


def storage_figures(
    out_dir: AnyPath, manifest: Manifest, problems: list[str]
) -> StorageFigures | None:
    """Bytes of the token shards per position and per stored top-k entry, from the manifest
    (compact shards' entries checked against their footers), for output.encoding=compact or
    output.top_p below 1; None otherwise."""
    output = manifest.config.output
    if output.encoding == "plain" and output.top_p == 1.0:
        return None  # plain k-wide rows: k entries a position
    if output.rows == "examples":
        return None
    totals = manifest.totals
    shards = [s for s in manifest.shards if not s.file.startswith(f"{layout.DOCUMENTS}/")]
    size = sum(s.bytes for s in shards)  # recorded at commit; checked above
    positions = totals.output_rows
    entries = totals.topk_entries if totals.topk_entries is not None else positions * output.k
    if output.encoding == "compact":
        try:
            in_footers = sum(_footer_entries(out_dir / s.file) for s in shards)
        except Exception:  # an unreadable shard is a finding of the shard checks already
            in_footers = None
        if in_footers is not None and in_footers != entries:
            problems.append(
                f"manifest totals.topk_entries is {entries:,}, the shards' footers hold {in_footers:,}"
            )
    return StorageFigures(size, positions, entries)


def _read_skipped(out_dir: AnyPath, problems: list[str]) -> pa.Array | None:
    path = layout.skipped_path(out_dir)
    if not path.exists():
        problems.append(f"{layout.SKIPPED} is missing")
        return None
    try:
        table = pq.ParquetFile(storage.open_input(path)).read(columns=["id", "reason"])
    except Exception as exc:
        problems.append(f"{layout.SKIPPED} is not readable: {first_line(exc)}")
        return None
    ids = table.column("id").combine_chunks()
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        problems.append(
            f"{layout.SKIPPED} lists {len(repeated)} ids more than once, e.g. {_examples(repeated)}"
        )
    return ids


def input_ids(path: str, id_column: str | None) -> pa.Array:
    """Each input row's id as the job assigns it: its id column value, else its global row index."""
    files = corpus.find_input_files(path)
    if id_column is None:
        total = sum(pq.ParquetFile(storage.open_input(f)).metadata.num_rows for f in files)
        return pa.array(np.arange(total, dtype=np.int64))
    chunks = []
    for file in files:
        parquet = pq.ParquetFile(storage.open_input(file))
        schema = parquet.schema_arrow
        if id_column not in schema.names:
            raise UserError(
                f"id column {id_column!r} not in {file}; columns are {', '.join(schema.names)}"
            )
        column = parquet.read(columns=[id_column]).column(0)
        column = corpus.as_ids(column, file, id_column)
        chunks.extend(column.chunks)
    if not chunks:
        return pa.array([], pa.string())
    return pa.concat_arrays(chunks)


def _same_type(values: pa.Array, like: pa.DataType) -> pa.Array:
    return values if values.type == like else values.cast(like)


def _check_input(
    ids_in: pa.Array,
    scored: pa.Array,
    skipped: pa.Array | None,
    totals: Totals,
    problems: list[str],
) -> None:
    """Every input id is in exactly one of output and skipped, and nothing else is."""
    skipped = pa.array([], ids_in.type) if skipped is None else skipped
    try:
        scored, skipped = _same_type(scored, ids_in.type), _same_type(skipped, ids_in.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        problems.append(f"output ids have type {scored.type}, the input ids {ids_in.type}")
        return
    if totals.input_rows != len(ids_in):
        problems.append(
            f"manifest totals.input_rows is {totals.input_rows}, the input has {len(ids_in)} rows"
        )
    in_scored = pc.is_in(ids_in, value_set=scored)
    in_skipped = pc.is_in(ids_in, value_set=skipped)
    both = ids_in.filter(pc.and_(in_scored, in_skipped))
    if len(both):
        problems.append(
            f"{len(both)} input ids are both in the output and in {layout.SKIPPED}, "
            f"e.g. {_examples(both)}"
        )
    neither = ids_in.filter(pc.invert(pc.or_(in_scored, in_skipped)))
    if len(neither):
        problems.append(
            f"{len(neither)} input ids are neither in the output nor in {layout.SKIPPED}, "
            f"e.g. {_examples(neither)}"
        )
    for where, values in (("the output", scored), (layout.SKIPPED, skipped)):
        extra = values.filter(pc.invert(pc.is_in(values, value_set=ids_in)))
        if len(extra):
            problems.append(
                f"{len(extra)} ids in {where} are not input ids, e.g. {_examples(extra)}"
            )


def _check_totals(
    manifest: Manifest, scored: pa.Array, all_read: bool, problems: list[str]
) -> None:
    """The manifest's totals against its shard list and the ids the shards hold."""
    totals = manifest.totals
    first = _folders(manifest)[0]
    listed = sum(
        s.rows
        for s in manifest.shards
        if not s.file.startswith(f"{layout.DOCUMENTS}/") or first == layout.DOCUMENTS
    )
    if totals.output_rows != listed:
        problems.append(
            f"manifest totals.output_rows is {totals.output_rows}, its shards hold {listed}"
        )
    if totals.input_rows != totals.scored_rows + totals.skipped_rows:
        problems.append(
            f"manifest totals: input_rows {totals.input_rows} != scored_rows "
            f"{totals.scored_rows} + skipped_rows {totals.skipped_rows}"
        )
    # Every scored row has at least one output row (a row with none is skipped), so the
    # shards must hold exactly scored_rows distinct ids (when all of them could be read).
    if all_read and len(scored) != totals.scored_rows:
        problems.append(
            f"manifest totals.scored_rows is {totals.scored_rows}, the shards hold rows of "
            f"{len(scored)} ids"
        )


def _check_skipped(
    skipped: pa.Array, scored: pa.Array, totals: Totals, problems: list[str]
) -> None:
    if len(skipped) != totals.skipped_rows:
        problems.append(
            f"manifest totals.skipped_rows is {totals.skipped_rows}, {layout.SKIPPED} "
            f"has {len(skipped)} rows"
        )
    if len(scored) and len(skipped):
        try:
            both = skipped.filter(pc.is_in(skipped, value_set=_same_type(scored, skipped.type)))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            both = pa.array([])
        if len(both):
            problems.append(
                f"{len(both)} ids are both in the output and in {layout.SKIPPED}, "
                f"e.g. {_examples(both)}"
            )


def _read_input_ids(
    manifest: Manifest, path: str | None, column: str | None, problems: list[str]
) -> pa.Array | None:
    """The input's ids (path and id column default to the manifest's); None, with a problem
    line, when they cannot be read."""
    path = path or manifest.config.input.path
    column = column if column is not None else manifest.config.input.id_column
    if not path:
        problems.append("no input to check: give --input PATH (the manifest names none)")
        return None
    try:
        return input_ids(path, column)
    except UserError as exc:
        problems.append(f"input: {exc}")
    except Exception as exc:  # an unreadable input file is a finding, not a crash
        problems.append(f"input {path} is not readable: {first_line(exc)}")
    return None


def _check_temporaries(
    out_dir: AnyPath, finished: bool, problems: list[str], warnings: list[str]
) -> None:
    """A dead writer's temporary is a warning; so is any other beside `_SUCCESS` (a run that
    writes shards removes `_SUCCESS` first); in an unfinished output it is a problem."""
    for path in layout.temporaries(out_dir):
        name = path.relative_to(out_dir)
        if layout.temporary_writer_alive(path) is False:
            warnings.append(
                f"temporary file {name} was left by a writer that is gone; the next run of the "
                "job or jobs.report removes it"
            )
        elif finished:
            warnings.append(
                f"temporary file {name} is not part of the output (its writer may still run: "
                "a report, or a process on another machine); delete it once none does"
            )
        else:
            problems.append(f"temporary file {name} left behind")


def _read_manifest(out_dir: AnyPath, problems: list[str]) -> Manifest | None:
    if not (out_dir / layout.MANIFEST).exists():
        problems.append(f"{layout.MANIFEST} is missing")
        return None
    data = layout.read_json(out_dir / layout.MANIFEST)
    if data is None:
        problems.append(f"{layout.MANIFEST} is not readable JSON")
        return None
    try:
        return Manifest.from_json(data)
    except ValueError as exc:
        problems.append(f"{layout.MANIFEST} {exc}")
        return None


def verify(
    out_dir: str | AnyPath,
    input_path: str | None = None,
    id_column: str | None = None,
    check_input: bool = False,
) -> Report:
    """Check `out_dir`; with `check_input`, account for every input id (path and id column default
    to the manifest's config). A path that does not exist or is a file raises UserError."""
    out_dir = storage.location(out_dir)
    try:
        if not out_dir.exists():
            raise UserError(f"{out_dir} does not exist")
        if not out_dir.is_dir():
            raise UserError(f"{out_dir} is a file, not an output directory")
    except OSError as exc:
        return Report([f"{out_dir} is not readable: {storage.explain(exc)}"])
    problems: list[str] = []
    warnings: list[str] = []
    finished = (out_dir / layout.SUCCESS).exists()
    if not finished:
        problems.append(f"{layout.SUCCESS} is missing: the job has not finished")
    _check_temporaries(out_dir, finished, problems, warnings)
    manifest = _read_manifest(out_dir, problems)
    if manifest is None:
        return Report(problems, warnings)
    scored, rows, all_read = _check_shards(out_dir, manifest, problems)
    report = Report(
        problems,
        warnings,
        len(manifest.shards),
        rows.get(layout.TOKENS, 0),
        rows.get(layout.DOCUMENTS),
    )
    _check_totals(manifest, scored, all_read, problems)
    report.storage = storage_figures(out_dir, manifest, problems)
    skipped = _read_skipped(out_dir, problems)
    if skipped is not None:
        # With the input at hand, _check_input says the same about both lists, per input id.
        _check_skipped(
            skipped,
            pa.array([], skipped.type) if check_input else scored,
            manifest.totals,
            problems,
        )
    if check_input:
        ids_in = _read_input_ids(manifest, input_path, id_column, problems)
        if ids_in is not None:
            report.input_rows = len(ids_in)
            _check_input(ids_in, scored, skipped, manifest.totals, problems)
        if ids_in is not None and input_path in (None, manifest.config.input.path):
            _check_input_bytes(out_dir, manifest.config.input.path, problems)
    return report


def _check_input_bytes(out_dir: AnyPath, path: str, problems: list[str]) -> None:
    """The output's own input path still holds the bytes the job fingerprinted (its ids alone
    would not tell an edited text)."""
    job = layout.read_json(out_dir / layout.JOB) or {}
    files = job.get("inputs")
    if not isinstance(files, list) or not all(isinstance(f, dict) and "path" in f for f in files):
        return  # no record of what was read: the ids are all there is to check
    for file, how in pins.differences(files, corpus.find_input_files(path)):
        if how == pins.APPEARED:
            problems.append(f"input file {file} was not an input of this output")
        else:
            problems.append(f"input file {file} is not the one this output read ({how})")
