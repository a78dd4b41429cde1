"""The extraction stages as generators, one record type between each pair:

    read(units) -> Unit and its requests        (a loader thread: read, tokenize)
    batches(...) -> Loaded                       (the same thread: bucket, pad, collate)
    Forward(...)(loaded) -> Computed             (the main thread: forward and reduce on the
                                                  device, results copied to pinned host memory)

A unit's end travels as a record with `batch=None` (`reduced=None`), not as another kind of item,
so no stage sorts its input by type. The writer stage is lib/output/units.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lib import faults
from lib.config import InputConfig
from lib.errors import HostMemoryError, UserError, out_of_host_memory
from lib.extract import batching, corpus, models, reduce, sampling
from lib.extract.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class Unit:
    """A work unit once read and tokenized: what its shards and record need."""

    work: corpus.WorkUnit
    ids: pa.Array
    skipped: list[tuple[int, str]]  # (row in unit, reason)
    input_ids: dict[int, list[int]] | None  # row -> its tokens, for output.rows=examples
    started_at: float  # unix time its reading began
    lengths: dict  # token-length histograms of the scored rows' texts (and targets)
    scored_rows: np.ndarray  # the rows that are scored, sorted
    truncated_rows: np.ndarray  # bool per row: text or target cut at input.max_length
    n_bytes: np.ndarray | None  # UTF-8 bytes of each row's scored text; None in generate mode
    tokens: int  # tokens its batches will carry (in generate mode, before the generated ones)


@dataclass
class Loaded:
    """Loader -> forward: a unit's next batch, or `batch=None` when the unit has no more."""

    unit: Unit
    batch: batching.Batch | None


@dataclass(frozen=True)
class BatchSize:
    """What one forward pass carried: rows, real tokens and padded tokens."""

    rows: int
    tokens: int
    padded: int


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
    """Forward -> writer: a batch's results, or `reduced=None` with the unit's batch sizes."""

    unit: Unit
    reduced: Reduced | None
    batches: list[BatchSize] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(batch.tokens for batch in self.batches)

    @property
    def padded_tokens(self) -> int:
        return sum(batch.padded for batch in self.batches)


# -- read and tokenize (loader thread) ----------------------------------------------------------
def window_context(cfg: InputConfig) -> int | None:
    """input.window_context with its default, or None when long texts are truncated."""
    if cfg.long_documents != "windows":
        return None
    return cfg.window_context or max(1, cfg.max_length // 2)


def text_bytes(table: pa.Table, task: str, prefix: str) -> np.ndarray | None:
    """UTF-8 bytes of each row's scored text: the target where one is scored, else the prefix
    and the text; None in generate mode, where the scored text is the model's own."""
    if task == batching.GENERATE:
        return None
    scored_target = task in (batching.CONTINUATION, batching.TARGETS)
    column = table.column("target" if scored_target else "text")
    lengths = pc.binary_length(column).fill_null(0).to_numpy().astype(np.int64)
    return lengths if scored_target else lengths + len(prefix.encode())


def read_unit(
    work: corpus.WorkUnit, cfg: InputConfig, lm: LoadedModel, task: str, *, examples: bool
) -> tuple[Unit, list[batching.Request]]:
    """Read and tokenize a unit: what its shards and record need, and its requests."""
    started_at = time.time()
    rows = corpus.read_unit(work, cfg)
    table = rows.table
    # The template is the tokenizer's, or input.chat_template set on it at plan time.
    chat = None if cfg.messages_column is None else batching.ChatInput(None, cfg.score_roles)
    tokenized = batching.tokenize_unit(
        table,
        lm.tokenizer,
        task,
        cfg.prefix,
        cfg.max_length,
        lm.decoder_start_token_id,
        window_context=window_context(cfg),
        chat=chat,
    )
    lengths = {"text": batching.length_histogram(tokenized.text_lengths, cfg.max_length)}
    if tokenized.target_lengths is not None:
        lengths["target"] = batching.length_histogram(tokenized.target_lengths, cfg.max_length)
    truncated_rows = np.zeros(table.num_rows, dtype=bool)
    truncated_rows[tokenized.truncated_rows] = True
    unreadable = dict(rows.unreadable)  # a text that is not UTF-8 was read as null: say why
    unit = Unit(
        work=work,
        ids=table.column("id").combine_chunks(),
        skipped=[(row, unreadable.get(row, why)) for row, why in tokenized.skipped],
        input_ids={r.row: r.ids for r in tokenized.requests} if examples else None,
        started_at=started_at,
        lengths=lengths,
        scored_rows=np.unique(np.array([r.row for r in tokenized.requests], dtype=np.int64)),
        truncated_rows=truncated_rows,
        n_bytes=tokenized.n_bytes
        if tokenized.n_bytes is not None
        else text_bytes(table, task, cfg.prefix),
        tokens=sum(len(r.ids) + len(r.decoder_ids or ()) for r in tokenized.requests),
    )
    return unit, tokenized.requests


def read(
    units: Iterable[corpus.WorkUnit],
    cfg: InputConfig,
    lm: LoadedModel,
    task: str,
    *,
    examples: bool,
) -> Iterator[tuple[Unit, list[batching.Request]]]:
    """Each unit read and tokenized, in order."""
    for work in units:
        yield read_unit(work, cfg, lm, task, examples=examples)


# -- bucket and pad (loader thread) -------------------------------------------------------------
def batches(
    read_units: Iterable[tuple[Unit, list[batching.Request]]],
    lm: LoadedModel,
    max_tokens: int,
    decoder_length: int,
) -> Iterator[Loaded]:
    """Each unit's padded batches, longest first (pinned on a GPU), then its end marker."""
    pin = lm.device.type == "cuda"
    multiple = batching.pad_multiple_for(lm.device)
    for unit, requests in read_units:
        for group in batching.make_batches(requests, max_tokens, decoder_length, multiple=multiple):
            batch = batching.collate(group, lm.pad_id, multiple)
            yield Loaded(unit, batch.pin_memory() if pin else batch)
        yield Loaded(unit, None)


# -- forward and reduce (main thread) -----------------------------------------------------------
def to_host(tensor: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Start a device-to-host copy into pinned memory (a no-op on CPU and for numpy arrays)."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class Progress:
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

    def batch_done(self, size: BatchSize) -> None:
        self.rows_done += size.rows
        self.bar.set_postfix_str(f"{self.rows_done:,}/{self.rows:,} rows", refresh=False)
        self.bar.update(size.tokens)


class Forward:
    """The forward stage: each batch through the model and the reduction, with a device OOM
    answered by halving the batch (and remembering the size that fits)."""

    def __init__(
        self,
        lm: LoadedModel,
        task: str,
        spec: reduce.ReduceSpec,
        *,
        max_tokens: int,
        max_new_tokens: int,
    ):
        self.lm, self.task, self.spec = lm, task, spec
        self.max_tokens, self.max_new_tokens = max_tokens, max_new_tokens
        self.multiple = batching.pad_multiple_for(lm.device)
        self.row_caps: dict[int, int] = {}  # padded length -> rows that fit after an OOM
        self.row_keys: dict[int, torch.Tensor] = {}  # unit -> its rows' sampling keys
        self.first_batch_at: float | None = None  # unix time the first batch reached the model

    def __call__(self, loaded: Iterable[Loaded], progress: Progress) -> Iterator[Computed]:
        """Each batch's reduced results, and each unit's end with its batch sizes."""
        sizes: dict[int, list[BatchSize]] = {}  # unit -> its batches so far
        for item in loaded:
            index = item.unit.work.index
            if index not in sizes:
                sizes[index] = []
                progress.unit_read(item.unit)
            if item.batch is None:
                self.row_keys.pop(index, None)
                yield Computed(item.unit, None, sizes.pop(index))
                continue
            if self.first_batch_at is None:
                self.first_batch_at = time.time()
            for reduced, size in self._forward(item.unit, item.batch):
                sizes[index].append(size)
                progress.batch_done(size)
                yield Computed(item.unit, reduced)

    def keys(self, unit: Unit) -> torch.Tensor:
        """The sampling keys of a unit's rows, on the device (computed once per unit)."""
        index = unit.work.index
        if index not in self.row_keys:
            keys = sampling.row_keys(unit.ids, self.spec.seed)
            self.row_keys[index] = torch.from_numpy(keys).to(self.lm.device)
        return self.row_keys[index]

    def reduce(
        self, batch: batching.Batch, row_keys: torch.Tensor | None = None
    ) -> tuple[Reduced, BatchSize]:
        """The batch's results (their copies to the host started) and its size; `row_keys` (its
        unit's, see `keys`) are needed to draw samples."""
        lm, spec = self.lm, self.spec
        scored = models.score(lm, batch.to(lm.device), self.task, self.max_new_tokens)
        keys = None
        if spec.samples:
            row = torch.as_tensor(scored.row, device=lm.device).long()
            position = torch.as_tensor(scored.position, device=lm.device)
            keys = sampling.position_keys(row_keys[row], position)
        logits_out = None
        if spec.full and lm.device.type == "cuda":  # stream full logits out chunk by chunk
            logits_out = torch.empty(
                (scored.states.shape[0], lm.vocab_size), dtype=spec.output_dtype, pin_memory=True
            )
        stats = reduce.reduce_states(
            scored.head,
            scored.states,
            scored.labels,
            spec,
            vocab_size=lm.vocab_size,
            logits_out=logits_out,
            tokens=scored.has_tokens,
            keys=keys,
        )
        host = {name: to_host(value) for name, value in stats.items()}
        row, position = to_host(scored.row), to_host(scored.position)
        token_id = to_host(scored.token_id)  # on the device in every task
        ready = None
        if lm.device.type == "cuda":
            # After the last copy: the writer reads the pinned buffers once this has passed, and
            # a copy queued after it could still be running then.
            ready = torch.cuda.Event(blocking=True)  # the writer sleeps on it instead of spinning
            ready.record()
        size = BatchSize(len(batch.requests), scored.real_tokens, scored.padded_tokens)
        return Reduced(row, position, token_id, host, ready), size

    def _forward(self, unit: Unit, batch: batching.Batch) -> list[tuple[Reduced, BatchSize]]:
        """Run a batch; on device OOM split it in halves and remember the size that fits."""
        width, requests = batch.input_ids.shape[1], batch.requests
        cap = self.row_caps.get(width)
        if cap is not None and len(requests) > cap:
            return self._split(unit, [requests[i : i + cap] for i in range(0, len(requests), cap)])
        try:
            with torch.inference_mode():
                faults.point("forward")
                return [self.reduce(batch, self.keys(unit) if self.spec.samples else None)]
        except torch.OutOfMemoryError:
            pass  # leave the except block so the failed batch's tensors can be freed
        except (MemoryError, RuntimeError) as exc:
            if not out_of_host_memory(exc):
                raise
            raise HostMemoryError(
                f"out of host memory in a batch of {len(requests)} rows of {width} tokens; lower "
                f"batching.max_tokens (now {self.max_tokens}) and run the same command to "
                "resume"
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
        return self._split(unit, [requests[:half], requests[half:]])

    def _split(
        self, unit: Unit, parts: list[list[batching.Request]]
    ) -> list[tuple[Reduced, BatchSize]]:
        collate = batching.collate
        return [
            result
            for part in parts
            for result in self._forward(unit, collate(part, self.lm.pad_id, self.multiple))
        ]
