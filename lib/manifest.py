"""The end of a job: `_skipped.parquet`, `_manifest.json`, then `_SUCCESS`, from the unit records."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lib import corpus, resume, writer
from lib.config import JobConfig
from lib.errors import UserError


def finalize(
    out_dir: Path,
    units: list[corpus.WorkUnit],
    fmt: str,
    schema: pa.Schema,
    id_type: pa.DataType,
    config: JobConfig,
    identity: dict,
    fp: str,
    run_id: str,
    wall: float,
    world_size: int,
) -> dict:
    """After every rank is done (main process): write `_skipped.parquet` and build the manifest."""
    shards, skipped_ids, skipped_reasons = [], [], []
    totals = {
        "input_rows": 0,
        "scored_rows": 0,
        "skipped_rows": 0,
        "truncated_rows": 0,
        "output_rows": 0,
    }
    run = {"units": 0, "rows": 0, "tokens": 0, "padded_tokens": 0}
    for unit in units:
        if not resume.committed(out_dir, unit, fmt):
            raise UserError(
                f"output.dir {out_dir}: shard {unit.name} is missing after all ranks finished"
            )
        record = json.loads((out_dir / writer.UNITS_DIR / f"{unit.name}.json").read_text())
        shards.append({"file": record["file"], "rows": record["rows"], "rank": record["rank"]})
        for key in ("input_rows", "scored_rows", "skipped_rows", "truncated_rows"):
            totals[key] += record[key]
        totals["output_rows"] += record["rows"]
        for item_id, reason in record["skipped"]:
            skipped_ids.append(item_id)
            skipped_reasons.append(reason)
        if record["run_id"] == run_id:
            run["units"] += 1
            run["rows"] += record["input_rows"]
            run["tokens"] += record["tokens"]
            run["padded_tokens"] += record["padded_tokens"]
    skipped = pa.table(
        {
            "id": pa.array(skipped_ids, type=id_type),
            "reason": pa.array(skipped_reasons, pa.string()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(skipped, sink)
    writer.write_atomic(out_dir / writer.SKIPPED, sink.getvalue().to_pybytes())
    manifest = {
        "format_version": 1,
        "fingerprint": fp,
        "config": config.to_dict(),
        "model": identity,
        "schema": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
        "format": fmt,
        "world_size": world_size,
        "shards": shards,
        "totals": totals,
        # This run's work only: a resumed run reports what it computed itself.
        "throughput": {
            **run,
            "wall_s": round(wall, 3),
            "padding_efficiency": round(run["tokens"] / max(run["padded_tokens"], 1), 4),
            "tokens_per_s": round(run["tokens"] / max(wall, 1e-9), 1),
            "rows_per_s": round(run["rows"] / max(wall, 1e-9), 2),
        },
    }
    return manifest


def write(out_dir: Path, manifest: dict) -> None:
    """The manifest, then `_SUCCESS` last: a directory with `_SUCCESS` is complete."""
    writer.write_atomic(out_dir / writer.MANIFEST, json.dumps(manifest, indent=2).encode())
    writer.crash_point("before_success")
    writer.write_atomic(out_dir / writer.SUCCESS, b"")
