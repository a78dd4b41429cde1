"""The end of a job: the skipped rows, `_manifest.json`, then `_SUCCESS`, from the unit records."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from lib import faults, storage
from lib.config import JobConfig
from lib.errors import UserError, output_error
from lib.extract import corpus, scores
from lib.output import layout
from lib.output.records import Manifest, ShardEntry, Totals, UnitRecord
from lib.storage import AnyPath

_HASH_THREADS = 4  # sha256 releases the GIL: shards hash side by side


@dataclass(frozen=True)
class RunFacts:
    """What the manifest says besides the unit records: the schemas, the model, the claim."""

    schema: pa.Schema  # the token shards'
    documents_schema: pa.Schema | None
    id_type: pa.DataType
    identity: dict
    fingerprint: str
    run_id: str
    recomputed: list[str]
    wall: float  # seconds this run took
    world_size: int


@dataclass
class _Sums:
    """The unit records added up, in unit order."""

    shards: list[ShardEntry] = field(default_factory=list)
    partials: list[dict] = field(default_factory=list)
    skipped: list[list] = field(default_factory=list)
    run: dict = field(
        default_factory=lambda: dict.fromkeys(("units", "rows", "tokens", "padded_tokens"), 0)
    )


def _record(
    out_dir: AnyPath,
    unit: corpus.WorkUnit,
    names: list[str],
    visible: dict,
    record: UnitRecord | None,
) -> UnitRecord:
    if record is None or not all(name in visible for name in names):
        raise UserError(
            f"output.dir {out_dir}: shard {unit.name} or its record is missing after all ranks "
            "finished; run the same command again to recompute it"
        )
    return record


def _check_shards(out_dir: AnyPath, records: list[UnitRecord], visible: dict) -> None:
    """Refuse `_SUCCESS` over a shard that no longer holds the bytes it was committed with
    (damaged or replaced while the job ran); a rerun recomputes it."""
    entries = [entry for record in records for entry in record.files]

    def intact(entry: ShardEntry) -> bool:
        path = visible[entry.file]
        return storage.matches(path, size=entry.bytes, digest=entry.sha256, etag=entry.etag)

    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        damaged = [
            e.file for e, ok in zip(entries, pool.map(intact, entries), strict=True) if not ok
        ]
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise UserError(
            f"output.dir {out_dir}: shard {damaged[0]}{more} changed after it was committed (its "
            "bytes no longer match its checksum); run the same command again to recompute it"
        )


def _write_skipped(out_dir: AnyPath, skipped: list[list], id_type: pa.DataType) -> None:
    ids, reasons = [item for item, _ in skipped], [reason for _, reason in skipped]
    table = pa.table({"id": pa.array(ids, type=id_type), "reason": pa.array(reasons, pa.string())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = out_dir / layout.SKIPPED
    try:
        path.parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise output_error(path.parent, exc) from None
    layout.write_atomic(path, sink.getvalue().to_pybytes(), out_dir)


def _fields(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def _sum(records: list[UnitRecord], level: str, run_id: str) -> tuple[_Sums, Totals]:
    sums = _Sums()
    totals = Totals(0, 0, 0, 0, 0, 0 if level != "tokens" else None)
    for record in records:
        sums.shards += [dataclasses.replace(entry, rank=record.rank) for entry in record.files]
        sums.partials.append(record.scores)
        sums.skipped += record.skipped
        totals.input_rows += record.input_rows
        totals.scored_rows += record.scored_rows
        totals.skipped_rows += record.skipped_rows
        totals.truncated_rows += record.truncated_rows
        totals.output_rows += record.files[0].rows
        if level != "tokens":
            totals.document_rows += record.files[-1].rows
        if record.run_id == run_id:  # this run's work only: a resume reports its own
            sums.run["units"] += 1
            sums.run["rows"] += record.input_rows
            sums.run["tokens"] += record.tokens
            sums.run["padded_tokens"] += record.padded_tokens
    entries = [record.topk_entries for record in records]
    if entries and None not in entries:
        totals.topk_entries = sum(entries)
    capped = [record.topk_capped for record in records]
    if capped and None not in capped:
        totals.topk_capped = sum(capped)
    return sums, totals


def finalize(
    out_dir: AnyPath, units: list[corpus.WorkUnit], config: JobConfig, facts: RunFacts
) -> Manifest:
    """After every rank is done (main process): write the skipped rows and build the manifest."""
    fmt, level = config.output.format, config.output.level
    visible = layout.visible_shards(out_dir, level)
    found = layout.read_records(out_dir, [unit.name for unit in units])
    records = [
        _record(out_dir, unit, layout.shard_names(unit.name, fmt, level), visible, found[unit.name])
        for unit in units
    ]
    check_started = time.perf_counter()
    _check_shards(out_dir, records, visible)
    check_s = time.perf_counter() - check_started
    sums, totals = _sum(records, level, facts.run_id)
    _write_skipped(out_dir, sums.skipped, facts.id_type)
    run, wall = sums.run, facts.wall
    return Manifest(
        format_version=layout.FORMAT_VERSION,
        fingerprint=facts.fingerprint,
        config=config,
        model=facts.identity,
        schema=_fields(facts.schema),
        documents_schema=_fields(facts.documents_schema) if facts.documents_schema else None,
        format=fmt,
        world_size=facts.world_size,
        shards=sums.shards,
        totals=totals,
        scores=scores.merge(sums.partials),
        throughput={
            **run,
            "wall_s": round(wall, 3),
            "padding_efficiency": round(run["tokens"] / max(run["padded_tokens"], 1), 4),
            "tokens_per_s": round(run["tokens"] / max(wall, 1e-9), 1),
            "rows_per_s": round(run["rows"] / max(wall, 1e-9), 2),
            "output_check_s": round(check_s, 6),
        },
        recomputed=facts.recomputed,
    )


def write(out_dir: AnyPath, manifest: Manifest) -> None:
    """The manifest, then `_SUCCESS` last: a directory with `_SUCCESS` is complete."""
    layout.write_json(out_dir / layout.MANIFEST, manifest.to_json(), out_dir)
    faults.point("before_success")
    layout.write_atomic(out_dir / layout.SUCCESS, b"", out_dir)
