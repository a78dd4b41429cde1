"""The end of a job: `_skipped.parquet`, `_manifest.json`, then `_SUCCESS`, from the unit records."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from lib import faults
from lib.config import JobConfig
from lib.errors import UserError
from lib.extract import corpus, scores
from lib.output import layout
from lib.storage import AnyPath

_COUNTS = ("input_rows", "scored_rows", "skipped_rows", "truncated_rows")


def _record(
    out_dir: AnyPath, unit: corpus.WorkUnit, fmt: str, level: str, visible: dict, record: dict
) -> dict:
    names = layout.shard_names(unit.name, fmt, level)
    if record is None or not all(name in visible for name in names):
        raise UserError(
            f"output.dir {out_dir}: shard {unit.name} or its record is missing after all ranks "
            "finished; run the same command again to recompute it"
        )
    return record


def _write_skipped(out_dir: AnyPath, ids: list, reasons: list[str], id_type: pa.DataType) -> None:
    skipped = pa.table(
        {"id": pa.array(ids, type=id_type), "reason": pa.array(reasons, pa.string())}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(skipped, sink)
    layout.write_atomic(out_dir / layout.SKIPPED, sink.getvalue().to_pybytes(), out_dir)


def _fields(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def finalize(
    out_dir: AnyPath,
    units: list[corpus.WorkUnit],
    *,
    config: JobConfig,
    schema: pa.Schema,
    documents_schema: pa.Schema | None,
    id_type: pa.DataType,
    identity: dict,
    fingerprint: str,
    run_id: str,
    wall: float,
    world_size: int,
    recomputed: list[str],
) -> dict:
    """After every rank is done (main process): write `_skipped.parquet` and build the manifest."""
    fmt = config.output.format
    shards, skipped_ids, skipped_reasons, partial_scores = [], [], [], []
    totals = dict.fromkeys((*_COUNTS, "output_rows"), 0)
    run = {"units": 0, "rows": 0, "tokens": 0, "padded_tokens": 0}
    visible = layout.visible_shards(out_dir, config.output.level)
    records = layout.read_records(out_dir, [unit.name for unit in units])
    topk_entries = []  # stored top-k entries per unit; None in records of older jobs
    for unit in units:
        record = _record(out_dir, unit, fmt, config.output.level, visible, records[unit.name])
        shards += [{**entry, "rank": record["rank"]} for entry in record["files"]]
        partial_scores.append(record["scores"])
        for key in _COUNTS:
            totals[key] += record[key]
        totals["output_rows"] += record["files"][0]["rows"]
        topk_entries.append(record.get("topk_entries"))
        if config.output.level != "tokens":
            totals["document_rows"] = totals.get("document_rows", 0) + record["files"][-1]["rows"]
        for item_id, reason in record["skipped"]:
            skipped_ids.append(item_id)
            skipped_reasons.append(reason)
        if record["run_id"] == run_id:
            run["units"] += 1
            run["rows"] += record["input_rows"]
            run["tokens"] += record["tokens"]
            run["padded_tokens"] += record["padded_tokens"]
    if topk_entries and None not in topk_entries:
        totals["topk_entries"] = sum(topk_entries)
    _write_skipped(out_dir, skipped_ids, skipped_reasons, id_type)
    return {
        "format_version": layout.FORMAT_VERSION,
        "fingerprint": fingerprint,
        "config": config.to_dict(),
        "model": identity,
        "schema": _fields(schema),
        **({"documents_schema": _fields(documents_schema)} if documents_schema else {}),
        "format": fmt,
        "world_size": world_size,
        "shards": shards,
        "totals": totals,
        "scores": scores.merge(partial_scores),
        # This run's work only: a resumed run reports what it computed itself.
        "throughput": {
            **run,
            "wall_s": round(wall, 3),
            "padding_efficiency": round(run["tokens"] / max(run["padded_tokens"], 1), 4),
            "tokens_per_s": round(run["tokens"] / max(wall, 1e-9), 1),
            "rows_per_s": round(run["rows"] / max(wall, 1e-9), 2),
        },
        "recomputed": recomputed,
    }


def write(out_dir: AnyPath, manifest: dict) -> None:
    """The manifest, then `_SUCCESS` last: a directory with `_SUCCESS` is complete."""
    layout.write_json(out_dir / layout.MANIFEST, manifest, out_dir)
    faults.point("before_success")
    layout.write_atomic(out_dir / layout.SUCCESS, b"", out_dir)
