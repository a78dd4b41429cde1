"""The job's fingerprint and the state of an output directory: fresh, resumable, done or foreign."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from lib import writer
from lib.config import JobConfig
from lib.corpus import InputFile, WorkUnit
from lib.errors import UserError


def _model_files(path: str) -> list[tuple[str, int]]:
    """Names and sizes of a local checkpoint's files (a hub checkpoint is pinned by its commit)."""
    if not os.path.isdir(path):
        return []
    return sorted((p.name, p.stat().st_size) for p in Path(path).iterdir() if p.is_file())


def fingerprint(config: JobConfig, inputs: list[InputFile], identity: dict) -> str:
    """Hash of all that changes the output: model, tokenizer, output-affecting keys, inputs."""
    c = config.to_dict()
    decoder = (
        dict(c["decoder"]) if c["decoder"]["mode"] == "generate" else {"mode": c["decoder"]["mode"]}
    )
    payload = {
        "model": {"path": c["model"]["path"], "dtype": c["model"]["dtype"]},
        "identity": identity,
        "model_files": _model_files(config.model.path),
        "input": c["input"],
        "decoder": decoder,
        "output": {
            key: c["output"][key] for key in ("logits", "k", "dtype", "format", "shard_rows")
        },
        "files": [(f.path, f.size, f.rows) for f in inputs],
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def _ours(name: str) -> bool:
    return (
        name.startswith("part-")
        or name.startswith(".part-")
        or name.startswith("._")
        or name in (writer.UNITS_DIR, writer.MANIFEST, writer.SUCCESS, writer.SKIPPED, writer.JOB)
    )


def _clear(out_dir: Path) -> None:
    for entry in out_dir.iterdir():
        if _ours(entry.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def remove_temporaries(out_dir: Path) -> int:
    """Delete hidden temporary files a killed run left behind; return how many."""
    stray = [p for p in out_dir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    units = out_dir / writer.UNITS_DIR
    if units.is_dir():
        stray += [p for p in units.iterdir() if p.name.endswith(".tmp")]
    for path in stray:
        path.unlink(missing_ok=True)
    return len(stray)


def _job_record(out_dir: Path) -> dict | None:
    """The `_job.json` of a previous run in `out_dir`, None when there is none."""
    job_file = out_dir / writer.JOB
    if not job_file.exists():
        return None
    try:
        record = json.loads(job_file.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        return {}  # unreadable: treated as another job's output
    return record


def prepare_output(out_dir: Path, fp: str, config: JobConfig) -> dict:
    """Create or check `out_dir` (main process only); returns the job record with this run's id."""
    previous = _job_record(out_dir) if out_dir.is_dir() else None
    if previous and previous.get("fingerprint") == fp and (out_dir / writer.SUCCESS).exists():
        # A finished job re-run rewrites nothing, not even a write probe.
        return {**previous, "complete": True}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{uuid.uuid4().hex}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"output.dir {out_dir}: cannot write there ({exc.strerror or exc})"
        ) from None
    existing = [
        p.name
        for p in out_dir.iterdir()
        if not (p.name.startswith(".") and p.name.endswith(".tmp"))
    ]
    if previous is not None:
        if previous.get("fingerprint") != fp:
            if not config.output.overwrite:
                raise UserError(
                    f"output.dir {out_dir} holds the output of a different job (model, input or "
                    "output settings changed); use a new directory or output.overwrite=true"
                )
            _clear(out_dir)
    elif existing:
        if not config.output.overwrite:
            what = "another job's output" if any(_ours(n) for n in existing) else "other files"
            raise UserError(
                f"output.dir {out_dir} is not empty and holds {what}; "
                "use a new directory or output.overwrite=true"
            )
        _clear(out_dir)
    remove_temporaries(out_dir)
    record = {
        "fingerprint": fp,
        "run_id": uuid.uuid4().hex,
        "started": time.time(),
        "config": config.to_dict(),
        "complete": False,
    }
    # The job record goes first: a run killed right after it resumes, whereas a directory
    # holding our files but no record would look like another job's output.
    writer.write_atomic(out_dir / writer.JOB, json.dumps(record, indent=2).encode())
    (out_dir / writer.UNITS_DIR).mkdir(exist_ok=True)
    return record


def committed(out_dir: Path, unit: WorkUnit, fmt: str) -> bool:
    """A unit is done when its shard is visible; its record was written just before."""
    return writer.shard_path(out_dir, unit.name, fmt).exists()
