"""The writer stage: each unit's batches into its shards, and its commit when it ends.

A writer thread turns the forward stage's results into numpy and feeds each unit's output kinds
(lib/output/rows.py); a unit that ends is handed to a commit thread, which writes what the unit
held, its document rows and scores, and commits its shards under its record
(lib/output/writer.py). Units that have not ended when the stream stops are discarded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from lib.errors import UserError
from lib.extract import scores
from lib.extract.stages import Computed, Reduced, Unit
from lib.output import writer
from lib.output.records import UnitRecord, UnitSpan
from lib.output.rows import Kind, Outputs, by_position
from lib.overlap import Workers
from lib.storage import AnyPath

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
class Committer:
    """Who commits: the job's fingerprint, this rank and run, and the lease check."""

    fingerprint: str
    rank: int
    run_id: str
    check_lease: Callable[[], None]


@dataclass
class UnitState:
    """The writer's state for one unit: its shards, opened on first use, and what it holds of
    each batch (numpy) until it ends."""

    unit: Unit
    shards: dict[str, writer.ShardWriter] = field(default_factory=dict)  # by folder
    parts: list[dict[str, np.ndarray]] = field(default_factory=list)

    def abort(self) -> None:
        for shard in self.shards.values():
            shard.abort()


def _numpy(value):
    return value.numpy() if isinstance(value, torch.Tensor) else value


def _kept(arrays: dict[str, np.ndarray], pinned: bool) -> dict[str, np.ndarray]:
    """Arrays a unit holds until it commits, out of pinned buffers: pinned pages are scarce,
    and the allocator caches them rather than giving them back."""
    return {name: value.copy() for name, value in arrays.items()} if pinned else arrays


def _topk_entries(arrays: dict[str, np.ndarray], k: int) -> int:
    """Top-k entries a unit's token rows store: k a position, or the kept counts (top_p)."""
    if "topk_count" in arrays:
        return int(arrays["topk_count"].sum())
    return len(arrays["position"]) * k


class UnitWriter:
    """The writer stage (`Sink(UnitWriter(...))`): feeds each unit's kinds of rows and commits
    the unit when it ends, on commit threads."""

    def __init__(
        self,
        out_dir: AnyPath,
        outputs: Outputs,
        committer: Committer,
        *,
        fmt: str,
        k: int,
        min_k_fraction: float,
    ):
        self.out_dir, self.outputs, self.committer = out_dir, outputs, committer
        self.fmt, self.k, self.min_k_fraction = fmt, k, min_k_fraction

    def __call__(self, computed: Iterable[Computed]) -> None:
        """Write each unit's rows and commit it (on a commit thread) when it ends; discard the
        shards of units that have not ended when the stream stops or fails."""
        open_units: dict[int, UnitState] = {}
        commits = Workers(commit_workers(), "commit")
        try:
            for item in computed:
                commits.check()
                index = item.unit.work.index
                state = open_units.setdefault(index, UnitState(item.unit))
                if item.reduced is not None:
                    self.add(state, item.reduced)
                else:
                    commits.submit(self._commit, state, item)
                    del open_units[index]  # the commit owns it now; before, a failure aborts it
        finally:
            for state in open_units.values():
                state.abort()
            commits.close()  # the units that ended are committed (or fail) before we return

    def _shard(self, state: UnitState, kind: Kind) -> Callable[[], writer.ShardWriter]:
        def opened() -> writer.ShardWriter:
            if kind.folder not in state.shards:
                schema = getattr(kind, "shard_schema", kind.schema)
                state.shards[kind.folder] = writer.ShardWriter(
                    self.out_dir, state.unit.work.name, schema, self.fmt, kind.folder
                )
            return state.shards[kind.folder]

        return opened

    def add(self, state: UnitState, item: Reduced) -> None:
        """Feed one batch to the unit's kinds of rows and hold what the unit needs of it."""
        pinned = item.ready is not None
        if pinned:
            item.ready.synchronize()
        arrays = {name: _numpy(value) for name, value in item.stats.items()}
        arrays.update(row=_numpy(item.row), position=_numpy(item.position))
        arrays["token_id"] = _numpy(item.token_id)
        for kind in self.outputs.kinds:
            kind.batch(self._shard(state, kind), arrays, state.unit)
        state.parts.append(_kept(self.outputs.held(arrays), pinned))

    def _commit(self, state: UnitState, end: Computed) -> None:
        """Write what the unit held, its document rows and scores; commit its shards."""
        unit, parts = state.unit, state.parts
        try:
            arrays = dict(_NO_POSITIONS)
            if parts:
                arrays = by_position(
                    {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
                )
            state.parts = []
            columns = scores.document_columns(
                arrays, unit.scored_rows, unit.n_bytes, unit.truncated_rows, self.min_k_fraction
            )
            for kind in self.outputs.kinds:
                kind.end(self._shard(state, kind), arrays, columns, unit)
            shards = [self._shard(state, kind)() for kind in self.outputs.kinds]
            record = self._record(unit, end, scores.partial(arrays, columns))
            if self.outputs.topk:  # for bytes per entry (jobs.verify)
                record.topk_entries = _topk_entries(arrays, self.k)
                if "topk_count" in arrays:  # top_p: how often output.k cut the mass short
                    record.topk_capped = int((arrays["topk_count"] >= self.k).sum())
            writer.commit(shards, record, self.committer.check_lease)
        except BaseException:
            state.abort()
            raise

    def _record(self, unit: Unit, end: Computed, unit_scores: dict) -> UnitRecord:
        """The unit's record, less its shards' entries (`writer.commit` adds those)."""
        skipped = [[unit.ids[row].as_py(), reason] for row, reason in unit.skipped]
        work = unit.work
        return UnitRecord(
            fingerprint=self.committer.fingerprint,
            rank=self.committer.rank,
            run_id=self.committer.run_id,
            unit=UnitSpan(work.index, work.file, work.start, work.stop),
            input_rows=work.rows,
            scored_rows=work.rows - len(skipped),
            skipped_rows=len(skipped),
            truncated_rows=int(unit.truncated_rows.sum()),
            tokens=end.tokens,
            padded_tokens=end.padded_tokens,
            started_at=round(unit.started_at, 3),
            committed_at=round(time.time(), 3),
            lengths=unit.lengths,
            batches=[[b.rows, b.tokens, b.padded] for b in end.batches],
            scores=unit_scores,
            skipped=skipped,
        )
