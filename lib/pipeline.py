"""The job as generator stages: read -> tokenize -> batch -> forward and reduce -> write.

    write(compute(load(units)))

`load` (a thread) reads each work unit, tokenizes it and cuts it into padded batches; `compute`
(the main thread) runs each batch's forward pass and the reduction on the device and starts
asynchronous copies of the (small) results to pinned host memory; `write` (a thread) turns them
into Arrow and hands each finished unit to commit threads, which write its shard (two with
`output.level=both`) and then its record. `lib.overlap` joins the stages with bounded queues,
so memory stays flat however large the corpus is. Ranks under `accelerate launch` take every
world_size-th unit and meet only at the end.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lib import faults, storage
from lib.config import JobConfig
from lib.errors import (
    HostMemoryError,
    Interrupted,
    UserError,
    out_of_host_memory,
    output_error,
)
from lib.extract import batching, corpus, models, pins, reduce, scores
from lib.output import layout, manifest, resume, writer
from lib.output.lease import Lease, started_at
from lib.overlap import Background, Sink, Workers
from lib.storage import AnyPath

log = logging.getLogger(__name__)
_IMPORTED_AT = time.time()

LOADER_QUEUE = 8  # padded batches waiting for the model
WRITER_QUEUE = 8  # reduced batches waiting to be written
SWITCH_INTERVAL = 0.0005  # seconds; see Extraction.run


def commit_workers() -> int:
    """Threads that sort, encode, compress and commit ended units while the writer takes the
    next unit's batches: half the cores, at most 4, or LOGIT_EXTRACT_COMMIT_WORKERS."""
    # Parquet encoding, zstd and hashing release the GIL, so commits use the cores a GPU host
    # has spare; each holds one unit's top-k rows. The tests set 1: their kill points count
    # files, which only one commit at a time makes exact.
    setting = os.environ.get("LOGIT_EXTRACT_COMMIT_WORKERS", "").strip()
    if not setting:
        return max(1, min(4, (os.cpu_count() or 2) // 2))
    if not setting.isdigit() or int(setting) < 1:
        raise UserError(f"LOGIT_EXTRACT_COMMIT_WORKERS={setting!r}: expected a positive integer")
    return int(setting)


@dataclass(frozen=True)
class Plan:
    """What a rank needs to know to extract its units, besides the config and the model."""

    task: str
    schema: pa.Schema  # position rows, as the reduction and writer.to_table build them
    shard_schema: pa.Schema  # what the shards hold: position rows or example rows
    documents_schema: pa.Schema | None  # document rows, at output.level documents or both
    out_dir: AnyPath
    rank: int
    run_id: str
    fingerprint: str
    check_lease: Callable[[], None]


@dataclass
class Unit:
    """A work unit once read and tokenized."""

    work: corpus.WorkUnit
    ids: pa.Array
    skipped: list[tuple[int, str]]
    input_ids: dict[int, list[int]] | None  # row -> its tokens, for output.rows=examples
    started_at: float  # unix time its reading began
    lengths: dict  # token-length histograms of the scored rows' texts (and targets)
    scored_rows: np.ndarray  # the rows that are scored, sorted
    truncated_rows: np.ndarray  # bool per row: text or target cut at input.max_length
    n_bytes: np.ndarray | None  # UTF-8 bytes of each row's scored text; None in generate mode
    tokens: int  # tokens its batches will carry (in generate mode, before the generated ones)


@dataclass
class Loaded:
    """Loader -> compute: a unit's next batch, or `batch=None` when the unit has no more."""

    unit: Unit
    batch: batching.Batch | None


@dataclass
class Reduced:
    """One batch's results on the host; `ready` is set when the device copies are done."""

    row: np.ndarray | torch.Tensor
    position: np.ndarray | torch.Tensor
    token_id: torch.Tensor
    stats: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None


@dataclass
class Computed:
    """Compute -> writer: a batch's results, or `reduced=None` with the unit's batch sizes."""

    unit: Unit
    reduced: Reduced | None
    batches: list[list[int]] = field(default_factory=list)  # [rows, tokens, padded tokens]

    @property
    def tokens(self) -> int:
        return sum(batch[1] for batch in self.batches)

    @property
    def padded_tokens(self) -> int:
        return sum(batch[2] for batch in self.batches)


class _Progress:
    """The bar counts tokens, not rows: rows run longest first within a unit, so a row count
    runs slow, then fast, and its ETA misleads (49 minutes shown for a 53-second job). Its
    total is the tokens of the units read so far plus, for the rest, their rows at the mean
    tokens per row seen."""

    def __init__(self, bar, rows: int):
        self.bar, self.rows = bar, rows
        self.rows_read = self.tokens_read = self.rows_done = 0

    def unit_read(self, unit: Unit) -> None:
        self.rows_read += unit.work.rows
        self.tokens_read += unit.tokens
        self.rows_done += len(unit.skipped)
        rest = (self.rows - self.rows_read) * self.tokens_read / max(self.rows_read, 1)
        self.bar.total = self.tokens_read + round(rest)

    def batch_done(self, rows: int, tokens: int) -> None:
        self.rows_done += rows
        self.bar.set_postfix_str(f"{self.rows_done:,}/{self.rows:,} rows", refresh=False)
        self.bar.update(tokens)


def _to_host(tensor: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Start a device-to-host copy into pinned memory (a no-op on CPU and for numpy arrays)."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _numpy(value):
    return value.numpy() if isinstance(value, torch.Tensor) else value


def _kept(arrays: dict[str, np.ndarray], pinned: bool) -> dict[str, np.ndarray]:
    """Arrays a unit holds until it commits, out of pinned buffers: pinned pages are scarce,
    and the allocator caches them rather than giving them back."""
    return {name: value.copy() for name, value in arrays.items()} if pinned else arrays


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


@dataclass
class UnitShard:
    """The writer's state for one unit: its shards, and its per-position arrays (numpy, one
    dict per batch; in full mode only the SCORE_FIELDS) until the unit ends."""

    unit: Unit
    tokens: writer.ShardWriter | None = None  # opened by the first write of token rows
    documents: writer.ShardWriter | None = None  # opened at the commit
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)


class Extraction:
    """One rank's share of the job: `run()` extracts its units and commits their shards."""

    def __init__(
        self,
        config: JobConfig,
        lm: models.LoadedModel,
        plan: Plan,
        units: list[corpus.WorkUnit],
        *,
        progress: bool,
    ):
        self.config = config
        self.lm = lm
        self.plan = plan
        self.units = units
        self.progress = progress
        self.token_rows = config.output.level != "documents"
        self.document_rows = config.output.level != "tokens"
        self.full = config.output.logits == "full" and self.token_rows
        self.examples = config.output.rows == "examples"
        # compact rows quantize float32 log-probabilities; plain rows store the logits as set
        compact = config.output.encoding == "compact"
        self.output_dtype = torch.float32 if compact else getattr(torch, config.output.dtype)
        self.row_caps: dict[int, int] = {}  # padded length -> rows that fit after an OOM
        # What this device wants; run_job has resolved the budget already (for the manifest),
        # but an Extraction built directly from a config can still hold its null.
        self.pad_multiple = batching.pad_multiple_for(lm.device)
        self.max_tokens = batching.max_tokens_for(config.batching.max_tokens, lm.device)
        self.first_batch_at: float | None = None  # unix time the first batch reached the model

    # -- stage 1: read, tokenize, bucket, pad (loader thread) --------------------------------
    def load(self) -> Iterator[Loaded]:
        """Each unit's batches, longest first, then its end marker."""
        cfg = self.config
        pin = self.lm.device.type == "cuda"
        decoder_length = cfg.decoder.max_new_tokens if self.plan.task == batching.GENERATE else 0
        for work in self.units:
            unit, requests = self._read(work)
            for group in batching.make_batches(
                requests, self.max_tokens, decoder_length, multiple=self.pad_multiple
            ):
                batch = self._collate(group)
                yield Loaded(unit, batch.pin_memory() if pin else batch)
            yield Loaded(unit, None)

    def _collate(self, requests: list[batching.Request]) -> batching.Batch:
        """Pad requests into a batch as this device wants it."""
        return batching.collate(requests, self.lm.pad_id, self.pad_multiple)

    def _read(self, work: corpus.WorkUnit) -> tuple[Unit, list[batching.Request]]:
        """Read and tokenize a unit: what its shards and record need, and its requests."""
        cfg, task = self.config.input, self.plan.task
        started_at = time.time()
        rows = corpus.read_unit(work, cfg)
        table = rows.table
        tokenized = batching.tokenize_unit(
            table,
            self.lm.tokenizer,
            task,
            cfg.prefix,
            cfg.max_length,
            self.lm.decoder_start_token_id,
            window_context=_window_context(cfg),
        )
        lengths = {"text": batching.length_histogram(tokenized.text_lengths, cfg.max_length)}
        if tokenized.target_lengths is not None:
            lengths["target"] = batching.length_histogram(tokenized.target_lengths, cfg.max_length)
        truncated_rows = np.zeros(table.num_rows, dtype=bool)
        truncated_rows[tokenized.truncated_rows] = True
        # a text that is not UTF-8 was read as null; its record says why
        unreadable = dict(rows.unreadable)
        skipped = [(row, unreadable.get(row, reason)) for row, reason in tokenized.skipped]
        unit = Unit(
            work,
            table.column("id").combine_chunks(),
            skipped,
            {r.row: r.ids for r in tokenized.requests} if self.examples else None,
            started_at,
            lengths,
            np.unique(np.array([r.row for r in tokenized.requests], dtype=np.int64)),
            truncated_rows,
            _text_bytes(table, task, cfg.prefix),
            sum(len(r.ids) + len(r.decoder_ids or ()) for r in tokenized.requests),
        )
        return unit, tokenized.requests

    # -- stage 2: forward and reduce on the device (main thread) -----------------------------
    def compute(self, loaded: Iterable[Loaded], bar) -> Iterator[Computed]:
        """Each batch's reduced results, and each unit's end with its token counts."""
        batches: dict[int, list[list[int]]] = {}  # unit -> [rows, tokens, padded tokens] a batch
        progress = _Progress(bar, sum(u.rows for u in self.units))
        for item in loaded:
            index = item.unit.work.index
            if index not in batches:
                batches[index] = []
                progress.unit_read(item.unit)
            if self.first_batch_at is None and item.batch is not None:
                self.first_batch_at = time.time()
            if item.batch is None:
                yield Computed(item.unit, None, batches.pop(index))
                continue
            for reduced, sizes in self._forward(item.unit, item.batch):
                batches[index].append(sizes)
                progress.batch_done(sizes[0], sizes[1])
                yield Computed(item.unit, reduced)

    def _reduce(self, batch: batching.Batch) -> tuple[Reduced, list[int]]:
        """The batch's results, and its [rows, tokens, padded tokens]."""
        lm, cfg = self.lm, self.config
        scored = models.score(lm, batch.to(lm.device), self.plan.task, cfg.decoder.max_new_tokens)
        logits_out = None
        if self.full and lm.device.type == "cuda":  # stream full logits out chunk by chunk
            logits_out = torch.empty(
                (scored.states.shape[0], lm.vocab_size), dtype=self.output_dtype, pin_memory=True
            )
        stats = reduce.reduce_states(
            scored.head,
            scored.states,
            scored.labels,
            k=cfg.output.k if self.token_rows else 0,
            output_dtype=self.output_dtype,
            full=self.full,
            vocab_size=lm.vocab_size,
            logits_out=logits_out,
            tokens=scored.has_tokens,
            moments=self.document_rows,
            top_p=cfg.output.top_p,
            min_k=cfg.output.min_k,
        )
        host = {name: _to_host(value) for name, value in stats.items()}
        row, position = _to_host(scored.row), _to_host(scored.position)
        token_id = _to_host(scored.token_id)  # on the device in every task
        ready = None
        if lm.device.type == "cuda":
            # After the last copy: the writer reads the pinned buffers once this has passed, and
            # a copy queued after it could still be running then.
            ready = torch.cuda.Event(blocking=True)  # the writer sleeps on it instead of spinning
            ready.record()
        reduced = Reduced(row, position, token_id, host, ready)
        return reduced, [len(batch.requests), scored.real_tokens, scored.padded_tokens]

    def _forward(self, unit: Unit, batch: batching.Batch) -> list[tuple[Reduced, list[int]]]:
        """Run a batch; on device OOM split it in halves and remember the size that fits."""
        width = batch.input_ids.shape[1]
        cap = self.row_caps.get(width)
        requests = batch.requests
        if cap is not None and len(requests) > cap:
            return [
                result
                for i in range(0, len(requests), cap)
                for result in self._forward(unit, self._collate(requests[i : i + cap]))
            ]
        try:
            with torch.inference_mode():
                faults.point("forward")
                return [self._reduce(batch)]
        except torch.OutOfMemoryError:
            pass  # leave the except block so the failed batch's tensors can be freed
        except (MemoryError, RuntimeError) as exc:
            if not out_of_host_memory(exc):
                raise
            raise HostMemoryError(
                f"out of host memory in a batch of {len(requests)} rows of {width} tokens; lower "
                f"batching.max_tokens (now {self.max_tokens}) and run the same command to resume"
            ) from None
        if self.lm.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(requests) == 1:
            row_id = unit.ids[requests[0].row].as_py()
            raise UserError(
                f"input id {row_id!r} does not fit in device memory even alone "
                f"({len(requests[0].ids)} tokens); lower input.max_length"
            )
        half = len(requests) // 2
        self.row_caps[width] = min(half, self.row_caps.get(width, half))
        log.warning(
            "out of memory on %d rows of %d tokens; retrying in halves", len(requests), width
        )
        return self._forward(unit, self._collate(requests[:half])) + self._forward(
            unit, self._collate(requests[half:])
        )

    # -- stage 3: Arrow conversion and shard commits (writer thread) -------------------------
    def write(self, computed: Iterable[Computed]) -> None:
        """Write each unit's rows and commit its shard (on a commit thread) when the unit ends;
        discard the shards of units that have not ended when the stream stops or fails."""
        open_shards: dict[int, UnitShard] = {}
        commits = Workers(commit_workers(), "commit")
        try:
            for item in computed:
                commits.check()
                index = item.unit.work.index
                if index not in open_shards:
                    open_shards[index] = UnitShard(item.unit)
                if item.reduced is not None:
                    self._add(open_shards[index], item.reduced)
                else:
                    commits.submit(self._commit, open_shards[index], item)
                    del open_shards[index]  # the commit owns it now; before, a failure aborts it
        finally:
            for state in open_shards.values():
                _abort(state)
            commits.close()  # the units that ended are committed (or fail) before we return

    def _add(self, state: UnitShard, item: Reduced) -> None:
        pinned = item.ready is not None
        if pinned:
            item.ready.synchronize()
        arrays = {name: _numpy(value) for name, value in item.stats.items()}
        arrays.update(row=_numpy(item.row), position=_numpy(item.position))
        arrays["token_id"] = _numpy(item.token_id)
        if self.full:  # full logits are large: stream them, never hold a unit of them
            scores = {name: arrays[name] for name in SCORE_FIELDS if name in arrays}
            state.parts.append(_kept(scores, pinned))
            if self.examples:  # a row's positions are all in one batch
                arrays = _sorted(arrays)
            self._tokens_shard(state).write(self._table(arrays, state.unit))
        else:  # top-k rows are small: keep the unit and write it in input order
            state.parts.append(_kept(arrays, pinned))

    def _table(self, arrays: dict[str, np.ndarray], unit: Unit) -> pa.Table:
        """Shard rows from sorted arrays: position rows, or example rows built from them."""
        arrays = dict(arrays)
        row, position = arrays.pop("row"), arrays.pop("position")
        token_id = arrays.pop("token_id")
        table = writer.to_table(self.plan.schema, unit.ids, row, position, token_id, arrays)
        if not self.examples:
            return table
        return writer.to_examples(
            self.plan.shard_schema, table, row, unit.input_ids, self.lm.decoder_start_token_id
        )

    def _commit(self, state: UnitShard, end: Computed) -> None:
        """Write what the unit held, its document rows and scores; commit its shards."""
        unit, parts = state.unit, state.parts
        try:
            arrays = dict(_NO_POSITIONS)
            if parts:
                arrays = _sorted(
                    {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
                )
            state.parts = []
            shards = []
            if self.token_rows:
                if not self.full and parts:
                    self._tokens_shard(state).write(self._table(arrays, unit))
                shards.append(self._tokens_shard(state))
            columns = scores.document_columns(
                arrays,
                unit.scored_rows,
                unit.n_bytes,
                unit.truncated_rows,
                self.config.output.min_k_fraction,
            )
            if self.document_rows:
                out, fmt = self.plan.out_dir, self.config.output.format
                schema = self.plan.documents_schema
                state.documents = writer.ShardWriter(
                    out, unit.work.name, schema, fmt, layout.DOCUMENTS
                )
                state.documents.write(
                    scores.documents_table(schema, unit.ids, unit.scored_rows, columns)
                )
                shards.append(state.documents)
            record = self._record(unit, end, scores.partial(arrays, columns))
            if self.token_rows and not self.full:  # for bytes per entry (jobs.verify)
                record["topk_entries"] = _topk_entries(arrays, self.config.output.k)
            writer.commit(shards, record, self.plan.check_lease)
        except BaseException:
            _abort(state)
            raise

    def _tokens_shard(self, state: UnitShard) -> writer.ShardWriter:
        if state.tokens is None:
            out = self.plan.out_dir
            name, fmt = state.unit.work.name, self.config.output.format
            state.tokens = writer.ShardWriter(out, name, self.plan.shard_schema, fmt)
        return state.tokens

    def _record(self, unit: Unit, end: Computed, unit_scores: dict) -> dict:
        """The unit's record, less its shards' entries (`writer.commit` adds those)."""
        skipped = [[unit.ids[row].as_py(), reason] for row, reason in unit.skipped]
        work = unit.work
        return {
            "fingerprint": self.plan.fingerprint,
            "rank": self.plan.rank,
            "run_id": self.plan.run_id,
            "unit": {
                "index": work.index,
                "file": work.file,
                "start": work.start,
                "stop": work.stop,
            },
            "input_rows": work.rows,
            "scored_rows": work.rows - len(skipped),
            "skipped_rows": len(skipped),
            "truncated_rows": int(unit.truncated_rows.sum()),
            "tokens": end.tokens,
            "padded_tokens": end.padded_tokens,
            "started_at": round(unit.started_at, 3),
            "committed_at": round(time.time(), 3),
            "lengths": unit.lengths,
            "batches": end.batches,
            "scores": unit_scores,
            "skipped": skipped,
        }

    # -- the three stages together ------------------------------------------------------------
    def run(self) -> None:
        """Extract and commit every unit of this rank: the three stages, joined."""
        from tqdm.auto import tqdm

        bar = tqdm(
            total=0,
            unit="tok",
            unit_scale=True,
            disable=not self.progress,
            dynamic_ncols=True,
            desc="extract",
        )
        loaded = Background(self.load(), LOADER_QUEUE, name="loader")
        # Full logits are large: the host holds the batch being written and at most one more.
        sink = Sink(self.write, 1 if self.full else WRITER_QUEUE, name="writer")
        # While the loader or writer runs Python code, the main thread waits for the GIL after
        # every operator it dispatches, by up to the switch interval (5 ms by default); a
        # shorter one keeps the device fed (measured: a d64 T5 job took 5% less time at 0.5 ms).
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            for item in self.compute(loaded, bar):
                sink.put(item)
        except BaseException:
            bar.leave = False  # erase the bar, so that an error is the last line on the terminal
            raise
        finally:
            sys.setswitchinterval(switch_interval)
            interrupted = _shut_down(loaded, sink)
            if interrupted is not None:
                bar.leave = False
            bar.close()
        if interrupted is not None:
            raise interrupted
        if sink.error is not None:
            raise sink.error


def _window_context(cfg) -> int | None:
    """input.window_context with its default, or None when long texts are truncated."""
    if cfg.long_documents != "windows":
        return None
    return cfg.window_context or max(1, cfg.max_length // 2)


def _check_windows(config: JobConfig, task: str, lm: models.LoadedModel) -> None:
    """`input.long_documents=windows` scores whole texts with a causal model."""
    if config.input.long_documents != "windows":
        return
    why = None
    if task != batching.CAUSAL:
        why = "seq2seq models" if lm.is_seq2seq else "input.target_column (a continuation)"
    elif config.output.rows == "examples":
        why = "output.rows=examples"
    elif lm.tokenizer.bos_token_id is None and lm.tokenizer.eos_token_id is None:
        why = "a tokenizer with neither a BOS nor an EOS token to predict the first token from"
    if why:
        raise UserError(
            f"config key input.long_documents: windows scores whole texts with a causal model, "
            f"not with {why}; use input.long_documents=truncate"
        )


def _text_bytes(table: pa.Table, task: str, prefix: str) -> np.ndarray | None:
    """UTF-8 bytes of each row's scored text: the target where one is scored, else the prefix
    and the text; None in generate mode, where the scored text is the model's own."""
    if task == batching.GENERATE:
        return None
    scored_target = task in (batching.CONTINUATION, batching.TARGETS)
    column = table.column("target" if scored_target else "text")
    lengths = pc.binary_length(column).fill_null(0).to_numpy().astype(np.int64)
    return lengths if scored_target else lengths + len(prefix.encode())


def _topk_entries(arrays: dict[str, np.ndarray], k: int) -> int:
    """Top-k entries a unit's token rows store: k a position, or the kept counts (top_p)."""
    if "topk_count" in arrays:
        return int(arrays["topk_count"].sum())
    return len(arrays["position"]) * k


def _abort(state: UnitShard) -> None:
    for shard in (state.tokens, state.documents):
        if shard is not None:
            shard.abort()


_NO_POSITIONS = {
    "row": np.zeros(0, np.int32),
    "position": np.zeros(0, np.int32),
    "has_token": np.zeros(0, bool),
    "token_logprob": np.zeros(0, np.float32),
    "token_rank": np.zeros(0, np.int32),
    "entropy": np.zeros(0, np.float32),
    "top1_logprob": np.zeros(0, np.float32),
    "logprob_std": np.zeros(0, np.float32),
}


def _sorted(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays in input order: by row, then position (numpy is faster than an Arrow take)."""
    order = np.lexsort((arrays["position"], arrays["row"]))
    return {name: values[order] for name, values in arrays.items()}


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


def _claim(
    out_dir: AnyPath, config: JobConfig, inputs: list, units: list, identity: dict
) -> tuple[dict, Lease | None]:
    """Main process: fingerprint the inputs, then either find the job finished (writing
    nothing) or take the directory's lease and prepare it. Returns what every rank needs."""
    checksum_started = time.perf_counter()
    files = resume.input_checksums(inputs)
    checksum_s = time.perf_counter() - checksum_started
    model = resume.model_record(identity["path"], identity)  # ~ expanded
    model_checksum_s = time.perf_counter() - checksum_started - checksum_s
    fp = resume.fingerprint(config, files, model)
    done = resume.finished(out_dir, fp, units, config.output.format, config.output.level)
    if done is not None:
        try:  # what writers that died left (a killed jobs.report); nothing else is touched
            layout.remove_dead_temporaries(out_dir, holding_lease=False)
        except OSError:
            pass
        return {"complete": done}, None
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
    for name in prepared.recomputed:
        log.warning("shard %s failed its checksum; recomputing it", name)
    shared = {
        "fingerprint": fp,
        "run_id": run_id,
        "recomputed": prepared.recomputed,
        "checksum_s": checksum_s,
        "model_checksum_s": model_checksum_s,
        "inputs": files,
        # each rank's own handles are checked against these (lib/extract/pins.py): no second hash
        "stamps": [item.pin.shared() if item.pin else None for item in inputs],
    }
    return shared, lease


def _share(state, value: dict | None, error: BaseException | None) -> dict:
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


@dataclass
class _Setup:
    """What run_job learns before any rank extracts: inputs, units, model, schemas."""

    inputs: list[corpus.InputFile]
    units: list[corpus.WorkUnit]
    id_type: pa.DataType
    lm: models.LoadedModel
    task: str
    schema: pa.Schema
    shard_schema: pa.Schema
    documents_schema: pa.Schema | None


def _set_up(config: JobConfig, device: torch.device) -> _Setup:
    """Check the inputs and the output location, load the model, plan the units."""
    inputs = corpus.inspect_inputs(config.input)
    try:
        return _plan(config, device, inputs)
    except BaseException:
        corpus.close(inputs)
        raise


def _plan(config: JobConfig, device: torch.device, inputs: list[corpus.InputFile]) -> _Setup:
    """_set_up's work once the inputs are held."""
    resume.check_layout(config.input.path, storage.location(config.output.dir), inputs)
    corpus.check_unique_ids(inputs, config.input)
    id_type = corpus.id_type(inputs, config.input)
    lm = models.load_model(config.model, device)
    if config.output.k > lm.vocab_size:
        raise UserError(
            f"config key output.k: {config.output.k} is larger than the vocabulary ({lm.vocab_size})"
        )
    task = models.task_for(lm, config.decoder, has_targets=config.input.target_column is not None)
    models.check_lengths(lm, task, config.input.max_length, config.decoder.max_new_tokens)
    _check_windows(config, task, lm)
    schema = writer.output_schema(
        id_type,
        config.output.k,
        lm.vocab_size,
        config.output.dtype,
        full=config.output.logits == "full",
        encoding=config.output.encoding,
    )
    shard_schema = schema
    if config.output.rows == "examples":
        shard_schema = writer.examples_schema(schema, lm.is_seq2seq)
    documents_schema = None
    if config.output.level != "tokens":
        if task == batching.START:
            raise UserError(
                f"config key output.level: {config.output.level} needs scored tokens, and "
                "decoder.mode=start scores none (one decoder step, no target); use "
                "decoder.mode=targets or generate, or output.level=tokens"
            )
        documents_schema = scores.documents_schema(id_type)
    units = corpus.plan_units(inputs, config.output.shard_rows)
    log.info(
        "plan: input files %d, rows %d, units %d; model %s (%s, %s on %s); task %s",
        len(inputs),
        sum(f.rows for f in inputs),
        len(units),
        lm.identity["path"],
        lm.identity["architecture"],
        lm.identity["dtype"],
        device,
        task,
    )
    return _Setup(inputs, units, id_type, lm, task, schema, shard_schema, documents_schema)


RANK_WAIT = datetime.timedelta(days=7)  # the longest one rank waits for another


def run_job(config: JobConfig, progress: bool = True) -> dict:
    """Run the whole job on this process's share and, on the main process, return the manifest.

    `progress=False` hides the progress bar (the main process shows it otherwise)."""
    from accelerate import PartialState

    started = time.perf_counter()
    out_dir = storage.location(config.output.dir)
    commit_workers()  # a bad LOGIT_EXTRACT_COMMIT_WORKERS is refused before any work
    # Ranks wait for rank 0's checks (hashing the inputs and the model) at the start, and for
    # the slowest rank at the end (a resume can leave all the work to one); NCCL's default of
    # 10 minutes (gloo's 30) would kill a healthy job there. A dead rank still ends the job:
    # the launcher stops the others.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=RANK_WAIT)
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(config.runtime.threads))
    try:
        return _run(config, progress, state, started, out_dir)
    finally:
        torch.set_num_threads(threads)  # the caller's own setting, for library use


def _threads(requested: int | None) -> int:
    """runtime.threads, else OMP_NUM_THREADS (torchrun sets it), else the cores this process
    may use over the ranks on this host."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _run(config: JobConfig, progress: bool, state, started: float, out_dir: AnyPath) -> dict:
    """run_job's work, with torch's threads set."""
    # the batch budget this device gets, as the manifest and the report will show it
    budget = batching.max_tokens_for(config.batching.max_tokens, state.device)
    config = replace(config, batching=replace(config.batching, max_tokens=budget))
    setup = _set_up(config, state.device)
    try:
        return _extract(config, progress, state, started, out_dir, setup)
    finally:
        corpus.close(setup.inputs)


def _extract(
    config: JobConfig, progress: bool, state, started: float, out_dir: AnyPath, setup: _Setup
) -> dict:
    """Claim the output, extract this rank's units, finish on the main process."""
    claim, lease, error = None, None, None
    if state.is_main_process:
        try:
            claim, lease = _claim(out_dir, config, setup.inputs, setup.units, setup.lm.identity)
        except (UserError, OSError) as exc:
            error = exc
    try:
        claim = _share(state, claim, error)
        if "complete" in claim:
            return {**claim["complete"], "already_complete": True} if state.is_main_process else {}
        if not state.is_main_process:  # this rank's handles hold the bytes the main one hashed
            for item, entry, stamp in zip(
                setup.inputs, claim["inputs"], claim["stamps"], strict=True
            ):
                item.pin.confirm(entry, stamp)
        plan = Plan(
            task=setup.task,
            schema=setup.schema,
            shard_schema=setup.shard_schema,
            documents_schema=setup.documents_schema,
            out_dir=out_dir,
            rank=state.process_index,
            run_id=claim["run_id"],
            fingerprint=claim["fingerprint"],
            check_lease=(lease or Lease(out_dir / layout.LOCK, claim["run_id"])).check,
        )
        done = resume.committed(out_dir, setup.units, config.output.format, config.output.level)
        mine = [
            u
            for u in setup.units
            if u.index % state.num_processes == state.process_index and u.index not in done
        ]
        extraction = Extraction(
            config, setup.lm, plan, mine, progress=progress and state.is_main_process
        )
        extraction.run()
        state.wait_for_everyone()
        result = {}
        if state.is_main_process:
            result = _finish(config, setup, claim, time.perf_counter() - started, state)
            if extraction.first_batch_at is not None:
                startup = extraction.first_batch_at - _process_start()
                result["throughput"]["startup_s"] = round(startup, 3)
            manifest.write(out_dir, result)
        state.wait_for_everyone()
        return result
    finally:
        if out_dir.is_dir():
            layout.remove_own_temporaries(out_dir)
        if lease is not None:
            lease.release()


def _finish(config: JobConfig, setup: _Setup, claim: dict, wall: float, state) -> dict:
    """Main process, after every rank is done: the manifest, then `_SUCCESS`, once the inputs
    on disk are proven to be the ones read."""
    out_dir = storage.location(config.output.dir)
    recheck_started = time.perf_counter()
    pins.recheck(claim["inputs"], corpus.find_input_files(config.input.path))
    recheck_s = time.perf_counter() - recheck_started
    resume.refuse_foreign(out_dir, setup.units, config.output.format, config.output.level)
    result = manifest.finalize(
        out_dir,
        setup.units,
        config=config,
        schema=setup.shard_schema,
        documents_schema=setup.documents_schema,
        id_type=setup.id_type,
        identity=setup.lm.identity,
        fingerprint=claim["fingerprint"],
        run_id=claim["run_id"],
        wall=wall,
        world_size=state.num_processes,
        recomputed=claim["recomputed"],
    )
    result["throughput"]["input_checksum_s"] = round(claim["checksum_s"], 6)
    result["throughput"]["model_checksum_s"] = round(claim["model_checksum_s"], 6)
    result["throughput"]["input_recheck_s"] = round(recheck_s, 6)
    return result


def _process_start() -> float:
    """Unix time this process started (Linux); elsewhere, when this module was imported."""
    started = started_at(os.getpid())
    return _IMPORTED_AT if started is None else started
