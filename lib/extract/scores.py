"""Scores from a unit's per-position statistics: one row per document, and the partial sums
from which the manifest's corpus scores (perplexity, bits per byte, calibration) are merged.

Every figure is over the positions that have a token (`token_id` not null). The arrays come
sorted by row, then position, as the writer holds a unit before it commits it.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15  # equal-width bins of the top-1 probability
_LN2 = math.log(2)


def _lowest_mean(values: np.ndarray, rows: np.ndarray, counts: np.ndarray, fraction: float):
    """Per row (rows sorted, `counts` tokens each, all > 0), the mean of its lowest
    max(1, floor(fraction * count)) values."""
    order = np.lexsort((values, rows))
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(values)) - np.repeat(starts, counts)
    take = np.maximum(1, np.floor(fraction * counts).astype(np.int64))
    kept = rank < np.repeat(take, counts)
    sums = np.bincount(np.repeat(np.arange(len(counts)), counts)[kept], values[order][kept])
    return sums / take


def document_columns(
    arrays: dict[str, np.ndarray],
    scored_rows: np.ndarray,
    n_bytes: np.ndarray | None,
    truncated: np.ndarray,
    min_k_fraction: float,
) -> dict[str, np.ndarray]:
    """Per-document numpy columns for `scored_rows` (sorted unit rows); `n_bytes` and
    `truncated` are per unit row. Documents with no token get nulls (NaN) in their means."""
    has = arrays["has_token"]
    rows = arrays["row"][has]
    doc = np.searchsorted(scored_rows, rows)
    n = len(scored_rows)
    counts = np.bincount(doc, minlength=n)
    logprob = arrays["token_logprob"][has].astype(np.float64)

    def per_doc(values: np.ndarray) -> np.ndarray:
        return np.bincount(doc, values, minlength=n)

    with np.errstate(divide="ignore", invalid="ignore"):
        sum_logprob = per_doc(logprob)
        mean_logprob = sum_logprob / counts
        columns = {
            "n_tokens": counts.astype(np.int32),
            "truncated": truncated[scored_rows],
            "sum_logprob": sum_logprob,
            "mean_logprob": mean_logprob,
            "perplexity": np.exp(-mean_logprob),
            "mean_entropy": per_doc(arrays["entropy"][has].astype(np.float64)) / counts,
            "top1_accuracy": per_doc((arrays["token_rank"][has] == 0).astype(np.float64)) / counts,
        }
        if n_bytes is not None:
            columns["n_bytes"] = n_bytes[scored_rows]
            bpb = -sum_logprob / (_LN2 * columns["n_bytes"])
            # a cut text, no token scored, or no bytes (an empty target still scores its EOS)
            unknown = columns["truncated"] | (counts == 0) | (columns["n_bytes"] == 0)
            columns["bits_per_byte"] = np.where(unknown, np.nan, bpb)
    lowest = {"min_k_logprob": logprob}
    if "logprob_std" in arrays:  # computed at the levels that write document rows
        # z = (log p(x) - mu) / sigma with mu = sum p log p = -entropy; a flat distribution
        # (sigma = 0) gives z = 0.
        spread = arrays["logprob_std"][has].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(spread > 0, (logprob + arrays["entropy"][has]) / spread, 0.0)
        lowest["min_k_plus_plus"] = z
    for name, values in lowest.items():
        columns[name] = np.full(n, np.nan)
        some = counts > 0
        columns[name][some] = _lowest_mean(values, doc, counts[some], min_k_fraction)
    return columns


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of the top-1 probability: positions, their summed probability and
    how many were right (sums, so that units and shards add up)."""
    bins = np.minimum((confidence * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    return (
        np.bincount(bins, minlength=ECE_BINS),
        np.bincount(bins, confidence, ECE_BINS),
        np.bincount(bins, correct, ECE_BINS),
    )


def partial(arrays: dict[str, np.ndarray], columns: dict[str, np.ndarray]) -> dict:
    """A unit's sums for the corpus scores (kept in its record; `merge` adds them up)."""
    has = arrays["has_token"]
    confidence = np.exp(arrays["top1_logprob"][has].astype(np.float64))
    correct = arrays["token_rank"][has] == 0
    counts, confidence_sums, correct_sums = calibration_bins(confidence, correct)
    # the documents whose bits_per_byte column is set: not cut, a token scored, some bytes
    n_bytes = columns.get("n_bytes")
    whole = ~columns["truncated"] & (columns["n_tokens"] > 0)
    if n_bytes is not None:
        whole &= n_bytes > 0
    return {
        "tokens": int(has.sum()),
        "sum_logprob": float(columns["sum_logprob"].sum()),
        "sum_entropy": float(arrays["entropy"][has].astype(np.float64).sum()),
        "top1_correct": int(correct.sum()),
        # bits per byte over those documents (None where texts have no bytes)
        "whole_sum_logprob": float(columns["sum_logprob"][whole].sum()),
        "whole_bytes": None if n_bytes is None else int(n_bytes[whole].sum()),
        "calibration_counts": counts.tolist(),
        "calibration_confidence": confidence_sums.tolist(),
        "calibration_correct": correct_sums.astype(int).tolist(),
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def merge(partials: list[dict]) -> dict:
    """The manifest's `scores` from every unit's partial sums, in unit order (so the figures do
    not depend on how many processes wrote the units)."""
    tokens = sum(p["tokens"] for p in partials)
    mean_logprob = _ratio(sum(p["sum_logprob"] for p in partials), tokens)
    has_bytes = all(p["whole_bytes"] is not None for p in partials)
    whole_bytes = sum(p["whole_bytes"] for p in partials) if has_bytes else 0
    whole_logprob = sum(p["whole_sum_logprob"] for p in partials)
    zeros = [[0] * ECE_BINS]
    counts = np.sum([p["calibration_counts"] for p in partials] + zeros, axis=0, dtype=np.int64)
    confidence = np.sum([p["calibration_confidence"] for p in partials] + zeros, axis=0)
    correct = np.sum([p["calibration_correct"] for p in partials] + zeros, axis=0)
    ece = float((np.abs(correct - confidence)).sum() / tokens) if tokens else None
    return {
        "tokens": tokens,
        "mean_logprob": mean_logprob,
        "perplexity": None if mean_logprob is None else math.exp(-mean_logprob),
        "bits_per_byte": None if not whole_bytes else -whole_logprob / (_LN2 * whole_bytes),
        "mean_entropy": _ratio(sum(p["sum_entropy"] for p in partials), tokens),
        "top1_accuracy": _ratio(sum(p["top1_correct"] for p in partials), tokens),
        "ece": ece,
        "calibration": {
            "bins": ECE_BINS,
            "counts": counts.tolist(),
            # per bin: mean top-1 probability and share correct (null for an empty bin)
            "confidence": [
                float(c / n) if n else None for c, n in zip(confidence, counts, strict=True)
            ],
            "accuracy": [float(c / n) if n else None for c, n in zip(correct, counts, strict=True)],
        },
    }
