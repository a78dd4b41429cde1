"""What an output directory says about its run, aggregated for the report (`lib/inspect/report.py`).

The bookkeeping comes from the manifest, or `_job.json` and the unit records while the job has
not finished (their lengths, batch sizes and commit times included). The rows come from one
streaming pass over the committed shards that reads only the columns it needs, batch by batch,
into fixed-width histograms and calibration bins: memory is bounded by a record batch, whatever
the size of the output. Columns and files that newer jobs write are used when present: the
`entropy` column, the `documents/` shards, and the `scores` of the manifest or the records.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lib import storage
from lib.config import JobConfig, from_record
from lib.errors import UserError, first_line
from lib.extract import scores
from lib.output import compact, layout
from lib.output.records import Manifest, UnitRecord
from lib.overlap import Background
from lib.storage import AnyPath

HISTOGRAM_BINS = 64
MASS_BINS = 50
RANK_BINS = 33  # bin 0: rank 0; bin j: ranks 2**(j-1) .. 2**j - 1 (int32 ranks fit)
BATCH_BYTES = 32 << 20  # logits decoded per record batch
MAX_BATCH_ROWS = 1 << 16
READ_AHEAD = 2  # record batches decoded ahead of the arithmetic
READ_BUFFER = 8 << 20  # bytes of a Parquet column chunk read at a time
DOCUMENT_COLUMNS = ("perplexity", "bits_per_byte", "min_k_plus_plus")
TOKEN_COLUMNS = (
    "token_logprob",
    "token_rank",
    "logsumexp",
    "entropy",
    "topk_logits",
    "topk_logprob_deltas",  # compact rows' log-probabilities (lib/output/compact.py); no ids needed
    "topk_logprobs",  # an export's plain copy of compact or top-p rows: lists of any length
    "logits",
    "probe_logprobs",
)


# -- streaming histograms ----------------------------------------------------------------------
@dataclass
class Histogram:
    """Counts in equal-width bins. With `hi` set the range is fixed and values beyond it land in
    the edge bins; without it the range starts at the first values and doubles (neighbouring
    bins merge) whenever a value falls outside, so one pass needs no range in advance."""

    bins: int = HISTOGRAM_BINS
    lo: float = 0.0
    hi: float | None = None
    width: float = 0.0
    counts: np.ndarray = field(default=None)
    total: float = 0.0  # sum of the values counted, for the mean
    n: int = 0

    def __post_init__(self) -> None:
        if self.hi is None and self.bins % 2:
            raise ValueError("a histogram without a fixed range needs an even number of bins")
        self.counts = np.zeros(self.bins, np.int64)
        if self.hi is not None:
            self.width = (self.hi - self.lo) / self.bins

    def add(self, values: np.ndarray) -> None:
        """Count the finite values of `values`."""
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if not values.size:
            return
        if self.hi is None:
            self._cover(float(values.min()), float(values.max()))
        index = np.clip(((values - self.lo) / self.width).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(index, minlength=self.bins)
        self.total += float(values.sum())
        self.n += values.size

    def _cover(self, low: float, high: float) -> None:
        if self.width == 0.0:
            self.width = max((high - low) / self.bins * 1.01, 1e-6 * max(1.0, abs(low)))
            self.lo = math.floor(low / self.width) * self.width
        half = self.bins // 2
        while high >= self.lo + self.width * self.bins:  # double upwards
            self.counts = np.concatenate([self.counts.reshape(half, 2).sum(1), np.zeros(half, int)])
            self.width *= 2
        while low < self.lo:  # double downwards
            self.counts = np.concatenate([np.zeros(half, int), self.counts.reshape(half, 2).sum(1)])
            self.lo -= self.width * self.bins
            self.width *= 2

    @property
    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def quantile(self, q: float) -> float:
        """The q-quantile, to the resolution of a bin (linear within the bin)."""
        if not self.n:
            return float("nan")
        cumulative = np.cumsum(self.counts)
        target = q * cumulative[-1]
        i = int(np.searchsorted(cumulative, target))
        before = cumulative[i - 1] if i else 0
        inside = (target - before) / max(self.counts[i], 1)
        return float(self.lo + self.width * (i + inside))


@dataclass
class Calibration:
    """Top-1 confidence against accuracy in equal-width bins, as sums (mergeable)."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(scores.ECE_BINS))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(scores.ECE_BINS))
    correct: np.ndarray = field(default_factory=lambda: np.zeros(scores.ECE_BINS))
    stored_ece: float | None = None  # the manifest's, when it has one
    source: str = "shards"

    def add(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        """Count positions with their top-1 probability and whether top-1 was the actual token."""
        counts, confidence_sums, correct_sums = scores.calibration_bins(
            np.clip(confidence, 0.0, 1.0), correct
        )
        self.counts += counts
        self.confidence += confidence_sums
        self.correct += correct_sums

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of (share of positions) * |acc - conf|."""
        if self.stored_ece is not None:
            return self.stored_ece
        total = self.counts.sum()
        return float(np.abs(self.correct - self.confidence).sum() / total) if total else math.nan

    @classmethod
    def from_scores(cls, scores: dict) -> Calibration | None:
        """The manifest's `scores`: its ECE and reliability bins (per-bin counts, mean top-1
        probability and accuracy), if it has them."""
        bins = scores.get("calibration")
        if not isinstance(bins, dict) or not {"counts", "confidence", "accuracy"} <= set(bins):
            return None
        counts = np.asarray(bins["counts"], dtype=np.float64)
        means = [np.asarray(bins[key], dtype=np.float64) for key in ("confidence", "accuracy")]
        confidence, accuracy = (np.nan_to_num(values) * counts for values in means)
        ece = scores.get("ece")
        stored = float(ece) if ece is not None else None
        return cls(counts, confidence, accuracy, stored, "manifest")

    @classmethod
    def from_records(cls, records: list[UnitRecord]) -> Calibration | None:
        """Summed from the unit records' partial scores, where every record has them."""
        keys = ("calibration_counts", "calibration_confidence", "calibration_correct")
        parts = [r.scores for r in records]
        if not parts or not all(set(keys) <= set(p) for p in parts):
            return None
        sums = [np.sum([p[key] for p in parts], axis=0, dtype=np.float64) for key in keys]
        return cls(*sums, source="unit records")


# -- what the directory says about the run ------------------------------------------------------
@dataclass
class RunInfo:
    """The bookkeeping side of an output directory: manifest or job record, unit records."""

    out_dir: AnyPath
    manifest: Manifest | None
    config: JobConfig  # the manifest's, else the job record's (the defaults where neither is)
    records: list[UnitRecord]
    partial: bool
    skipped: dict[str, int]
    fmt: str | None


def read_run(out_dir: str | AnyPath) -> RunInfo:
    """Everything but the shards' rows; a UserError if `out_dir` is not an output directory."""
    out_dir = storage.location(out_dir)
    if not out_dir.exists():
        raise UserError(f"{out_dir} does not exist")
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} is not a directory")
    manifest = layout.read_manifest(out_dir)
    job = layout.read_json(out_dir / layout.JOB) or {}
    markers = (out_dir / layout.TOKENS, out_dir / layout.UNITS, out_dir / layout.DOCUMENTS)
    if manifest is None and not job and not any(p.is_dir() for p in markers):
        raise UserError(f"{out_dir} is not an output directory of this job (no {layout.JOB})")
    if manifest is not None:
        config, fingerprint = manifest.config, manifest.fingerprint
    else:
        config = from_record(job.get("config") or {}) or JobConfig()
        fingerprint = job.get("fingerprint")
    records = _records(out_dir, fingerprint)
    partial = manifest is None or not (out_dir / layout.SUCCESS).exists()
    fmt = manifest.format if manifest else config.output.format
    return RunInfo(out_dir, manifest, config, records, partial, _skipped(out_dir, records), fmt)


def _records(out_dir: AnyPath, fingerprint: str | None) -> list[UnitRecord]:
    """The unit records of this job whose shard is committed, in unit order."""
    names = [path.stem for path in sorted((out_dir / layout.UNITS).glob("part-*.json"))]
    visible = layout.visible_shards(out_dir, "both")
    found = []
    for record in layout.read_records(out_dir, names).values():
        if record is None or record.fingerprint != fingerprint:
            continue
        if not all(entry.file in visible for entry in record.files):
            continue  # a record without its shards is not committed
        found.append(record)
    return found


def _skipped(out_dir: AnyPath, records: list[dict]) -> dict[str, int]:
    """Skipped rows by reason: the skipped rows' file when the job finished, else the records."""
    path = layout.skipped_path(out_dir)
    if path.is_file() and (out_dir / layout.SUCCESS).exists():
        try:
            parquet = pq.ParquetFile(storage.open_input(path))
            reasons = parquet.read(columns=["reason"]).column("reason")
            counts = pc.value_counts(reasons).to_pylist()
            return {item["values"]: item["counts"] for item in counts}
        except (OSError, pa.ArrowException, KeyError):
            pass
    return dict(Counter(reason for r in records for _, reason in r.skipped))


@dataclass(frozen=True)
class RunTotals:
    """Rows over the output, and the tokens of every committed unit (this run's or not)."""

    input_rows: int
    scored_rows: int
    skipped_rows: int
    truncated_rows: int
    output_rows: int
    shard_tokens: int
    shard_padded_tokens: int


def totals(info: RunInfo) -> RunTotals:
    """Rows and tokens: the manifest's when the job finished, else summed over committed units."""
    records = info.records
    tokens = sum(r.tokens for r in records), sum(r.padded_tokens for r in records)
    if info.manifest is not None and not info.partial:
        t = info.manifest.totals
        rows = t.input_rows, t.scored_rows, t.skipped_rows, t.truncated_rows, t.output_rows
    else:
        rows = (
            sum(r.input_rows for r in records),
            sum(r.scored_rows for r in records),
            sum(r.skipped_rows for r in records),
            sum(r.truncated_rows for r in records),
            sum(r.files[0].rows for r in records),
        )
    return RunTotals(*rows, *tokens)


@dataclass(frozen=True)
class Timing:
    """This run's tokens, wall time, rate and processes."""

    tokens: int
    padded_tokens: int
    wall_s: float
    tokens_per_s: float
    processes: int


def timing(info: RunInfo) -> Timing:
    """Wall time, tokens/s and processes: the manifest's, else from the records' timestamps."""
    if info.manifest is not None and not info.partial:
        run = info.manifest.throughput
        return Timing(
            run["tokens"],
            run["padded_tokens"],
            run["wall_s"],
            run["tokens_per_s"],
            info.manifest.world_size,
        )
    records = info.records
    wall = (
        max(r.committed_at for r in records) - min(r.started_at for r in records)
        if records
        else math.nan
    )
    tokens = sum(r.tokens for r in records)
    return Timing(
        tokens,
        sum(r.padded_tokens for r in records),
        wall,
        tokens / wall if wall and wall > 0 else math.nan,
        len({r.rank for r in records}) or 1,
    )


def stored_calibration(info: RunInfo) -> Calibration | None:
    """The job's own calibration figures: the manifest's, or a partial output's unit records'."""
    if info.manifest is not None and not info.partial:
        return Calibration.from_scores(info.manifest.scores)
    return Calibration.from_records(info.records) if info.partial else None


def unit_rates(records: list[UnitRecord]) -> dict[tuple[int, str], np.ndarray]:
    """(run, rank) -> rows of (commit time, tokens/s) per unit: a unit's tokens over the time
    since its rank's previous commit (or since its reading began, if later)."""
    timed = sorted(records, key=lambda r: r.committed_at)
    start = min((r.started_at for r in timed), default=0.0)
    lines: dict[tuple[int, str], list] = {}
    last: dict[tuple[int, str], float] = {}
    for record in timed:
        key = (record.rank, record.run_id)
        begin = max(record.started_at, last.get(key, -math.inf))
        last[key] = record.committed_at
        seconds = max(record.committed_at - begin, 1e-6)
        lines.setdefault(key, []).append((record.committed_at - start, record.tokens / seconds))
    return {key: np.array(points) for key, points in lines.items()}


# -- the streaming pass over the token shards ---------------------------------------------------
@dataclass
class TokenStats:
    """What the report draws from the token rows, accumulated one record batch at a time."""

    positions: int = 0
    scored: int = 0  # positions with an actual token
    top1: int = 0  # of which the top-1 token was the actual one
    logprob: Histogram = field(default_factory=Histogram)
    rank: np.ndarray = field(default_factory=lambda: np.zeros(RANK_BINS, np.int64))
    mass: Histogram | None = None  # top-k mode only
    entropy: Histogram | None = None  # the column, or computed from full logits
    calibration: Calibration = field(default_factory=Calibration)
    mode: str = "topk"
    probes: dict[str, Histogram] = field(default_factory=dict)  # probe -> its probabilities


def token_shards(info: RunInfo) -> list[AnyPath]:
    """The token shards the manifest lists, or (a partial output) the committed ones of the
    output's format, by suffix where no format is known."""
    fmt = info.fmt
    shards = layout.listed_shards(info.out_dir)
    if fmt in layout.EXTENSIONS:
        return [p for p in shards if p.suffix == f".{layout.EXTENSIONS[fmt]}"]
    suffixes = {p.suffix for p in shards}
    return shards if len(suffixes) == 1 else []


def _unreadable(path: AnyPath, exc: BaseException) -> UserError:
    """The one-line error for a shard that cannot be read."""
    return UserError(
        f"cannot read {path}: {first_line(exc)} (python -m jobs.verify names damaged shards)"
    )


def _schema(path: AnyPath) -> pa.Schema:
    """A shard's schema, without reading its rows."""
    try:
        if path.suffix == ".arrow":
            return pa.ipc.open_file(storage.open_mapped(path)).schema
        return pq.ParquetFile(storage.open_input(path)).schema_arrow
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(path, exc) from None


def record_batches(files: list[AnyPath], columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
    """The shards' `columns` in batches of at most `rows` rows, one shard open at a time.
    Parquet pages stream through a small buffer: a full-logit row group can be a gigabyte."""
    for path in files:
        try:
            if path.suffix == ".arrow":
                reader = pa.ipc.open_file(storage.open_mapped(path))
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i).select(columns)
                    for offset in range(0, batch.num_rows, rows):
                        yield batch.slice(offset, rows)
            else:
                source = storage.open_input(path)
                with pq.ParquetFile(source, pre_buffer=False, buffer_size=READ_BUFFER) as shard:
                    yield from shard.iter_batches(batch_size=rows, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise _unreadable(path, exc) from None


def _batch_rows(schema: pa.Schema, max_length: int) -> int:
    """Rows per record batch so that one batch decodes about BATCH_BYTES of logits."""
    name = "logits" if "logits" in schema.names else "topk_logits"
    kind = schema.field(name).type if name in schema.names else pa.float32()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
        width = max_length  # example rows: one list entry per position
    else:
        width = 1
    per_position = 16 + (kind.list_size * 4 if pa.types.is_fixed_size_list(kind) else 0)
    return int(np.clip(BATCH_BYTES // (per_position * width), 1, MAX_BATCH_ROWS))


def scan_tokens(info: RunInfo) -> TokenStats | None:
    """One pass over the token shards, reading only the report's columns; None without shards."""
    files = token_shards(info)
    if not files:
        return None
    schema = _schema(files[0])
    columns = [name for name in TOKEN_COLUMNS if name in schema.names]
    stats = TokenStats(mode="full" if "logits" in columns else "topk")
    if {"topk_logits", "topk_logprob_deltas", "topk_logprobs"} & set(columns):
        stats.mass = Histogram(MASS_BINS, 0.0, 1.0)
    if "entropy" in columns or "logits" in columns:
        stats.entropy = Histogram(lo=0.0)
    if "probe_logprobs" in columns:
        width = schema.field("probe_logprobs").type
        width = (width.value_type if examples_type(width) else width).list_size
        names = info.config.output.probes
        names = names if len(names) == width else [f"probe {i}" for i in range(width)]
        stats.probes = {name: Histogram(MASS_BINS, 0.0, 1.0) for name in names}
    max_length = info.config.input.max_length
    examples = pa.types.is_list(schema.field("logsumexp").type)  # output.rows=examples
    # Decoding (in a thread) and the arithmetic here both release the GIL: they overlap.
    batches = record_batches(files, columns, _batch_rows(schema, max_length))
    reader = Background(batches, READ_AHEAD, "report-reader")
    try:
        for batch in reader:
            add_batch(stats, {name: _positions(batch.column(name), examples) for name in columns})
    finally:
        reader.close()
    return stats


def examples_type(tp: pa.DataType) -> bool:
    """Whether a column type is example rows' list of per-position values."""
    return pa.types.is_list(tp) or pa.types.is_large_list(tp)


def _positions(column: pa.Array, examples: bool) -> pa.Array:
    """A per-position column: as stored, or flattened from example rows' lists."""
    return column.flatten() if examples else column


def _matrix(column: pa.Array) -> np.ndarray:
    """(positions, width) from a fixed-size list column, in its storage dtype."""
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def _mass_and_first(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per position of a list column of log-probabilities (highest first, at least one each):
    the probability the list holds and its first entry."""
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float64)
    values = values[offsets[0] : offsets[-1]]
    starts = offsets[:-1] - offsets[0]
    return np.add.reduceat(np.exp(values), starts), values[starts]


def add_batch(stats: TokenStats, columns: dict[str, pa.Array]) -> None:
    """Fold one batch of position columns into the statistics."""
    logsumexp = columns["logsumexp"].to_numpy(zero_copy_only=False).astype(np.float32)
    rank = columns["token_rank"].to_numpy(zero_copy_only=False)  # float, NaN where no token
    has_token = ~np.isnan(rank) if rank.dtype.kind == "f" else np.ones(len(rank), bool)
    rank = rank[has_token].astype(np.int64)
    stats.positions += len(logsumexp)
    stats.scored += int(has_token.sum())
    stats.top1 += int((rank == 0).sum())
    stats.rank += np.bincount(np.frexp(rank.astype(np.float64))[1], minlength=RANK_BINS)[:RANK_BINS]
    stats.logprob.add(columns["token_logprob"].to_numpy(zero_copy_only=False)[has_token])
    if "entropy" in columns:
        stats.entropy.add(columns["entropy"].to_numpy(zero_copy_only=False))
    if "topk_logprobs" in columns:
        mass, top1 = _mass_and_first(columns["topk_logprobs"])
        stats.mass.add(np.minimum(mass, 1.0))
    elif "topk_logits" in columns or "topk_logprob_deltas" in columns:
        if "topk_logits" in columns:
            logprobs = _matrix(columns["topk_logits"]).astype(np.float32) - logsumexp[:, None]
        else:
            logprobs = compact.decode(None, columns["topk_logprob_deltas"], None)["topk_logprobs"]
        stats.mass.add(np.minimum(np.exp(logprobs).sum(axis=1), 1.0))
        top1 = logprobs[:, 0]
    else:
        logprobs = _matrix(columns["logits"]).astype(np.float32) - logsumexp[:, None]
        top1 = logprobs.max(axis=1)
        if "entropy" not in columns:
            probs = np.exp(logprobs)
            stats.entropy.add(-(probs * logprobs).sum(axis=1))
    stats.calibration.add(np.exp(top1[has_token]), (rank == 0).astype(np.float64))
    if stats.probes:
        probes = np.exp(_matrix(columns["probe_logprobs"]))
        for i, hist in enumerate(stats.probes.values()):
            hist.add(probes[:, i])


# -- the documents folder (output.level=documents|both) ------------------------------------------
def scan_documents(out_dir: AnyPath) -> dict[str, Histogram] | None:
    """Histograms of the per-document scores (perplexity on a log10 scale); None without any."""
    files = layout.listed_shards(out_dir, layout.DOCUMENTS)
    files = [p for p in files if p.suffix == files[0].suffix] if files else []
    if not files:
        return None
    columns = [name for name in DOCUMENT_COLUMNS if name in _schema(files[0]).names]
    if not columns:
        return None
    hists = {name: Histogram(bins=48) for name in columns}
    for batch in record_batches(files, columns, MAX_BATCH_ROWS):
        for name in columns:
            values = batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            if name == "perplexity":
                with np.errstate(divide="ignore", invalid="ignore"):
                    values = np.log10(values)
            hists[name].add(values)
    return hists
