"""Streaming aggregation for the run report: histograms and calibration bins built batch by
batch equal the same figures computed at once."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lib.inspect import run_stats
from lib.output.records import UnitRecord, UnitSpan


@pytest.mark.parametrize("values", [[5.0], [-3.0, 2.5, 7.25], np.linspace(-40, 0.3, 999)])
def test_streaming_histogram_counts_every_value(values):
    hist = run_stats.Histogram(bins=16)
    rng = np.random.default_rng(0)
    for part in np.array_split(rng.permutation(np.asarray(values)), 3):
        hist.add(part)
    assert hist.n == hist.counts.sum() == len(values)
    assert hist.edges[0] <= min(values) and hist.edges[-1] > max(values)
    expected, _ = np.histogram(values, bins=hist.edges)
    np.testing.assert_array_equal(hist.counts, expected)
    assert hist.mean == pytest.approx(np.mean(values))


def test_manifest_scores_take_precedence():
    scores = {
        "ece": 0.25,
        "calibration": {
            "counts": [2, 0, 2],
            "confidence": [0.1, None, 0.9],
            "accuracy": [0, None, 1],
        },
    }
    calibration = run_stats.Calibration.from_scores(scores)
    assert calibration.ece == 0.25 and calibration.source == "manifest"
    np.testing.assert_allclose(calibration.confidence, [0.2, 0, 1.8])
    assert run_stats.Calibration.from_scores({"ece": 0.1}) is None


def test_fixed_range_histogram_counts_outliers_in_its_edge_bins():
    hist = run_stats.Histogram(bins=4, lo=0.0, hi=1.0)
    hist.add(np.array([-0.5, 0.0, 0.3, 0.99, 1.0, 7.0, np.nan, np.inf]))
    np.testing.assert_array_equal(hist.counts, [2, 1, 0, 3])
    assert hist.n == 6
    assert hist.quantile(0.5) == pytest.approx(0.5, abs=0.25)  # within a bin of the median


def _record(**fields) -> UnitRecord:
    """A unit record with the given fields, the rest empty."""
    span = UnitSpan(0, "a.parquet", 0, 1)
    record = UnitRecord("fp", 0, "a", span, 1, 1, 0, 0, 0, 0, 0.0, 0.0, {}, [], {}, [])
    return dataclasses.replace(record, **fields)


def test_calibration_sums_the_records_partial_scores():
    parts = [
        {
            "calibration_counts": [1, 0, 3],
            "calibration_confidence": [0.1, 0, 2.4],
            "calibration_correct": [0, 0, 3],
        },
        {
            "calibration_counts": [2, 1, 0],
            "calibration_confidence": [0.3, 0.5, 0],
            "calibration_correct": [1, 0, 0],
        },
    ]
    calibration = run_stats.Calibration.from_records([_record(scores=p) for p in parts])
    np.testing.assert_allclose(calibration.counts, [3, 1, 3])
    # ECE: sum over bins of |correct - confidence| / positions
    assert calibration.ece == pytest.approx((0.6 + 0.5 + 0.6) / 7)
    assert run_stats.Calibration.from_records([_record(scores=parts[0]), _record()]) is None


def test_unit_rates_count_from_the_previous_commit_of_the_rank():
    def record(rank, start, commit, tokens, run="a"):
        return _record(rank=rank, run_id=run, started_at=start, committed_at=commit, tokens=tokens)

    records = [
        record(0, 100.0, 110.0, 1000),
        record(0, 105.0, 115.0, 1000),  # read ahead while the first unit ran: 5 s of its own
        record(1, 100.0, 104.0, 400),
        record(0, 200.0, 202.0, 100, run="b"),  # a later run starts a line of its own
    ]
    lines = run_stats.unit_rates(records)
    np.testing.assert_allclose(lines[(0, "a")], [[10, 100], [15, 200]])
    np.testing.assert_allclose(lines[(1, "a")], [[4, 100]])
    np.testing.assert_allclose(lines[(0, "b")], [[102, 50]])


def _llama_job(out, model_dirs, corpus, *extra: str) -> None:
    """A small top-k job of the tiny Llama (k = 4) into `out`."""
    from jobs import extract

    argv = [
        f"model.path={model_dirs['llama']}",
        f"input.path={corpus}",
        f"output.dir={out}",
        "input.max_length=12",
        "output.k=4",
        *extra,
    ]
    assert extract.main(argv) == 0


def test_example_rows_give_the_same_statistics(tmp_path, model_dirs, corpus):
    from lib import results

    out = tmp_path / "examples"
    _llama_job(out, model_dirs, corpus, "output.rows=examples", "output.format=arrow")
    stats = run_stats.scan_tokens(run_stats.read_run(out))
    arrays = results.load_arrays(out)  # example rows back as position rows
    has = arrays["has_token"]
    assert stats.positions == len(has) and stats.scored == has.sum()
    assert stats.logprob.mean == pytest.approx(arrays["token_logprob"][has].mean(), rel=1e-5)
    logprobs = results.topk_logprobs(arrays["topk_logits"], arrays["logsumexp"])
    assert stats.mass.mean == pytest.approx(np.exp(logprobs).sum(1).mean(), rel=1e-4)


def test_compact_rows_give_the_stored_mass(tmp_path, model_dirs, corpus):
    """The report reads compact rows' log-probabilities (no ids needed) for the stored mass."""
    from lib import results

    out = tmp_path / "compact"
    _llama_job(out, model_dirs, corpus, "output.encoding=compact")
    stats = run_stats.scan_tokens(run_stats.read_run(out))
    arrays = results.load_arrays(out)
    has = arrays["has_token"]
    assert stats.positions == len(has) and stats.scored == has.sum()
    assert stats.mass.mean == pytest.approx(np.exp(arrays["topk_logprobs"]).sum(1).mean(), rel=1e-4)
    assert stats.entropy.n == len(has)
