"""The job, top to bottom: plan, claim the output, run the stages, finish.

    write(forward(batches(read(units))))

`read` and `batches` (lib/extract/stages.py) run in a loader thread: each unit read, tokenized,
cut into padded batches. `Forward` runs in the main thread: the forward pass and the reduction
on the device, results copied to pinned host memory. The writer (lib/output/units.py) runs in a
thread and hands each finished unit to commit threads. lib/overlap.py joins the stages with
bounded queues, so memory stays flat however large the corpus is. Ranks under
`accelerate launch` take every world_size-th unit and meet only at the start and the end.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass, replace

import pyarrow as pa
import torch

from lib import runtime
from lib.config import JobConfig
from lib.errors import Interrupted, UserError
from lib.extract import batching, chat, corpus, models, pins, reduce, stages
from lib.extract.reduce import ReduceSpec
from lib.output import claim, layout, manifest, resume, rows, units
from lib.output.lease import Lease, started_at
from lib.overlap import Background, Sink
from lib.storage import AnyPath, location

log = logging.getLogger(__name__)
_IMPORTED_AT = time.time()

LOADER_QUEUE = 8  # padded batches waiting for the model
WRITER_QUEUE = 8  # reduced batches waiting to be written
SWITCH_INTERVAL = 0.0005  # seconds; see extract()
RANK_WAIT = datetime.timedelta(days=7)  # the longest one rank waits for another


@dataclass(frozen=True)
class Done:
    """What `run_job` returns on the main process: the manifest, and whether this run found
    the job complete (and wrote nothing)."""

    manifest: manifest.Manifest
    already_complete: bool = False


@dataclass
class Plan:
    """What every rank learns before it extracts: inputs, units, model, outputs."""

    inputs: list[corpus.InputFile]
    units: list[corpus.WorkUnit]
    id_type: pa.DataType
    lm: models.LoadedModel
    task: str
    outputs: rows.Outputs
    reduce: ReduceSpec


# -- 1. plan ------------------------------------------------------------------------------------
def plan(config: JobConfig, out_dir: AnyPath, device: torch.device) -> Plan:
    """Hold and check the inputs, check the output location, load the model, plan the units."""
    inputs = corpus.inspect_inputs(config.input)
    try:
        resume.check_layout(config.input.path, out_dir, inputs)
        corpus.check_unique_ids(inputs, config.input)
        id_type = corpus.id_type(inputs, config.input)
        lm = models.load_model(config.model, device)
        if config.input.messages_column is not None:
            template = chat.template_text(config.input.chat_template)
            chat.check(lm.tokenizer, template, config.input.score_roles, lm.is_seq2seq)
            if template is not None:  # every rank's tokenizer renders with it
                lm.tokenizer.chat_template = template
        task = models.task_for(
            lm, config.decoder, has_targets=config.input.target_column is not None
        )
        models.check_config(lm, task, config)
        probes = reduce.probe_ids(lm.tokenizer, config.output.probes)
    except BaseException:
        corpus.close(inputs)
        raise
    out = config.output
    outputs = rows.plan_outputs(
        config,
        id_type,
        lm.vocab_size,
        seq2seq=lm.is_seq2seq,
        decoder_start=lm.decoder_start_token_id,
    )
    units = corpus.plan_units(inputs, out.shard_rows)
    identity = lm.identity
    log.info(
        "plan: input files %d, rows %d, units %d; model %s (%s, %s on %s); task %s",
        len(inputs),
        sum(f.rows for f in inputs),
        len(units),
        identity["path"],
        identity["architecture"],
        identity["dtype"],
        device,
        task,
    )
    return Plan(inputs, units, id_type, lm, task, outputs, reduce.spec_for(out, probes))


# -- 3. the stages --------------------------------------------------------------------------------
def extract(
    config: JobConfig,
    job: Plan,
    mine: list[corpus.WorkUnit],
    committer: units.Committer,
    *,
    progress: bool,
) -> stages.Forward:
    """Extract and commit this rank's units: the three stages, joined by threads."""
    from tqdm.auto import tqdm

    lm, out = job.lm, config.output
    budget = config.batching.max_tokens
    decoder_length = config.decoder.max_new_tokens if job.task == batching.GENERATE else 0
    read = stages.read(mine, config.input, lm, job.task, examples=out.rows == "examples")
    loaded = Background(stages.batches(read, lm, budget, decoder_length), LOADER_QUEUE, "loader")
    write = units.UnitWriter(
        location(out.dir),
        job.outputs,
        committer,
        fmt=out.format,
        k=out.k,
        min_k_fraction=out.min_k_fraction,
    )
    # Full logits are large: the host holds the batch being written and at most one more.
    sink = Sink(write, 1 if job.outputs.streamed else WRITER_QUEUE, name="writer")
    forward = stages.Forward(
        lm, job.task, job.reduce, max_tokens=budget, max_new_tokens=config.decoder.max_new_tokens
    )
    bar = tqdm(
        total=0,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        dynamic_ncols=True,
        desc="extract",
    )
    try:
        # While the loader or writer runs Python code, the main thread waits for the GIL after
        # every operator it dispatches, by up to the switch interval (5 ms by default); a
        # shorter one keeps the device fed (measured: a d64 T5 job took 5% less time at 0.5 ms).
        with runtime.switch_interval(SWITCH_INTERVAL):
            for item in forward(loaded, stages.Progress(bar, sum(u.rows for u in mine))):
                sink.put(item)
    except BaseException:
        bar.leave = False  # erase the bar, so that an error is the last line on the terminal
        _shut_down(loaded, sink)
        bar.close()
        raise
    interrupted = _shut_down(loaded, sink)
    bar.leave = interrupted is None
    bar.close()
    if interrupted is not None:
        raise interrupted
    if sink.error is not None:
        raise sink.error
    return forward


# -- the whole job -----------------------------------------------------------------------------
def run_job(config: JobConfig, progress: bool = True) -> Done | None:
    """Run the whole job on this process's share; the main process returns what it did.

    `progress=False` hides the progress bar (the main process shows it otherwise)."""
    from accelerate import PartialState

    started = time.perf_counter()
    out_dir = location(config.output.dir)
    units.commit_workers()  # a bad LOGIT_EXTRACT_COMMIT_WORKERS is refused before any work
    # Ranks wait for rank 0's checks (hashing the inputs and the model) at the start, and for
    # the slowest rank at the end (a resume can leave all the work to one); NCCL's default of
    # 10 minutes (gloo's 30) would kill a healthy job there. A dead rank still ends the job:
    # the launcher stops the others.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=RANK_WAIT)
    # the batch budget this device gets, as the manifest and the report will show it
    budget = batching.max_tokens_for(config.batching.max_tokens, state.device)
    config = replace(config, batching=replace(config.batching, max_tokens=budget))
    with runtime.torch_threads(config.runtime.threads):
        job = plan(config, out_dir, state.device)  # 1. plan
        try:
            return _run(config, job, out_dir, state, started, progress=progress)
        finally:
            corpus.close(job.inputs)


def _run(
    config: JobConfig, job: Plan, out_dir: AnyPath, state, started: float, *, progress: bool
) -> dict:
    """Claim the output, extract this rank's units, finish on the main process."""
    held, lease, error = None, None, None
    if state.is_main_process:  # 2. claim
        try:
            held, lease = claim.claim(out_dir, config, job.inputs, job.units, job.lm.identity)
        except (UserError, OSError) as exc:
            error = exc
    try:
        held = claim.share(state, held, error)
        if isinstance(held, claim.Finished):
            return Done(held.manifest, already_complete=True) if state.is_main_process else None
        if not state.is_main_process:  # this rank's handles hold the bytes the main one hashed
            for item, entry, stamp in zip(job.inputs, held.inputs, held.stamps, strict=True):
                item.pin.confirm(entry, stamp)
        committed = resume.committed(out_dir, job.units, config.output.format, config.output.level)
        rank, ranks = state.process_index, state.num_processes
        mine = [u for u in job.units if u.index % ranks == rank and u.index not in committed]
        check = (lease or Lease(out_dir / layout.LOCK, held.run_id)).check
        committer = units.Committer(held.fingerprint, rank, held.run_id, check)
        forward = extract(config, job, mine, committer, progress=progress and state.is_main_process)
        state.wait_for_everyone()
        done = None
        if state.is_main_process:  # 4. finish
            result = finish(config, job, held, time.perf_counter() - started, state.num_processes)
            if forward.first_batch_at is not None:
                startup = forward.first_batch_at - _process_start()
                result.throughput["startup_s"] = round(startup, 3)
            manifest.write(out_dir, result)
            done = Done(result)
        state.wait_for_everyone()
        return done
    finally:
        if out_dir.is_dir():
            layout.remove_own_temporaries(out_dir)
        if lease is not None:
            lease.release()


# -- 4. finish ---------------------------------------------------------------------------------
def finish(
    config: JobConfig, job: Plan, held: claim.Claim, wall: float, world_size: int
) -> manifest.Manifest:
    """Main process, after every rank is done: once the inputs on disk are proven to be the ones
    read and the data folders hold only the job's shards, the manifest."""
    out_dir = location(config.output.dir)
    recheck_started = time.perf_counter()
    pins.recheck(held.inputs, corpus.find_input_files(config.input.path))
    recheck_s = time.perf_counter() - recheck_started
    resume.refuse_foreign(out_dir, job.units, config.output.format, config.output.level)
    facts = manifest.RunFacts(
        schema=job.outputs.token_schema,
        documents_schema=job.outputs.documents_schema,
        id_type=job.id_type,
        identity=job.lm.identity,
        fingerprint=held.fingerprint,
        run_id=held.run_id,
        recomputed=held.recomputed,
        wall=wall,
        world_size=world_size,
    )
    result = manifest.finalize(out_dir, job.units, config, facts)
    result.throughput["input_checksum_s"] = round(held.checksum_s, 6)
    result.throughput["model_checksum_s"] = round(held.model_checksum_s, 6)
    result.throughput["input_recheck_s"] = round(recheck_s, 6)
    return result


# -- threads, processes ------------------------------------------------------------------------
def _shut_down(loaded: Background, sink: Sink) -> Interrupted | None:
    """Let the writer commit the units that have ended (and discard the rest), then stop the
    loader. A signal that arrives meanwhile is returned, to be raised once both are joined."""
    interrupted = None
    while True:
        try:
            sink.close()
            loaded.close()
            return interrupted
        except Interrupted as signal_now:
            interrupted = signal_now


def _process_start() -> float:
    """Unix time this process started (Linux); elsewhere, when this module was imported."""
    started = started_at(os.getpid())
    return _IMPORTED_AT if started is None else started
