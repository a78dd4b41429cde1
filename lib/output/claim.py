"""Claiming the output directory before any rank extracts: the main process fingerprints the
inputs and the model, then finds the job finished (and writes nothing) or takes the lease and
prepares the directory; every rank gets the outcome."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from lib.config import JobConfig
from lib.errors import UserError, output_error
from lib.extract.corpus import InputFile, WorkUnit
from lib.output import layout, resume
from lib.output.lease import Lease
from lib.output.records import Manifest
from lib.storage import AnyPath

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """The main process's claim on the output, shared with every rank."""

    fingerprint: str
    run_id: str
    inputs: list[dict]  # the input files as fingerprinted (`_job.json`'s "inputs")
    stamps: list  # each input handle's stamp, which other ranks compare theirs with
    recomputed: list[str]  # shards of units found damaged, missing or unrecorded
    checksum_s: float  # hashing the inputs
    model_checksum_s: float  # hashing a local checkpoint's files


@dataclass(frozen=True)
class Finished:
    """The job was complete already: its manifest."""

    manifest: Manifest


def claim(
    out_dir: AnyPath,
    config: JobConfig,
    inputs: list[InputFile],
    units: list[WorkUnit],
    identity: dict,
) -> tuple[Claim | Finished, Lease | None]:
    """Main process: fingerprint, then find the job finished or take the lease and prepare."""
    started = time.perf_counter()
    files = resume.input_checksums(inputs)
    checksum_s = time.perf_counter() - started
    model = resume.model_record(identity["path"], identity)  # ~ expanded
    model_checksum_s = time.perf_counter() - started - checksum_s
    fp = resume.fingerprint(config, files, model)
    done = resume.finished(out_dir, fp, units, config.output.format, config.output.level)
    if done is not None:
        try:  # what writers that died left (a killed jobs.report); nothing else is touched
            layout.remove_dead_temporaries(out_dir, holding_lease=False)
        except OSError:
            pass
        return Finished(done), None
    run_id = uuid.uuid4().hex
    lease = Lease(out_dir / layout.LOCK, run_id)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lease.acquire(out_dir)
    except OSError as exc:
        raise output_error(out_dir, exc) from None
    try:
        prepared = resume.prepare_output(out_dir, fp, files, units, config, run_id, model=model)
    except BaseException:
        lease.release()
        raise
    for problem in prepared.problems:
        log.warning("%s; recomputing its unit", problem)
    stamps = [item.pin.shared() if item.pin else None for item in inputs]
    ours = Claim(fp, run_id, files, stamps, prepared.recomputed, checksum_s, model_checksum_s)
    return ours, lease


def share(state, value: Claim | Finished | None, error: BaseException | None) -> Claim | Finished:
    """The main process's claim (or its error) on every rank."""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = None if error is None else str(error)
        value, message = broadcast_object_list([value, message])
        if message is not None and error is None:
            raise UserError(message)
    if error is not None:
        raise error
    return value
