"""The compact encoding: its error bound, lossless ids, ties and masked entries, its footer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lib import compact


def test_error_bound_above_and_below_minus_20():
    logprobs = -np.concatenate([np.linspace(0, 20, 200_001), np.geomspace(20, 1e30, 50_001)])
    decoded = compact.logprobs_from_codes(compact.logprob_codes(logprobs)).astype(np.float64)
    error = np.abs(decoded - logprobs)
    high = logprobs >= -20
    assert error[high].max() <= 1 / 104 + 1e-6  # half a step, in float32
    assert (error[~high] / -logprobs[~high]).max() <= 1 / 255
    # Codes never decrease as the log-probability falls: deltas along a row are never negative.
    assert (np.diff(compact.logprob_codes(logprobs).astype(np.int64)) >= 0).all()


def test_special_values():
    codes = compact.logprob_codes(np.array([1e-6, 0.0, -np.inf, -3.4e38], np.float32))
    assert codes[:3].tolist() == [0, 0, compact.INF_CODE]  # a rounding excess above 0 is 0
    decoded = compact.logprobs_from_codes(codes)
    assert decoded[2] == -np.inf and np.isfinite(decoded[3]) and decoded[3] < -1e38


def test_id_order_round_trips_and_ranks_frequent_ids_first():
    rng = np.random.default_rng(0)
    ids = rng.zipf(1.3, size=20_000) % 32_000
    order = compact.id_order(ids)
    assert sorted(order.tolist()) == np.unique(ids).tolist()
    counts = np.bincount(ids, minlength=32_000)[order]
    assert counts[0] == counts.max() and (np.diff(np.floor(2 * np.log2(counts))) <= 0).all()
    packed = compact.pack_id_order(order)
    assert packed.isascii()  # some readers (Polars) refuse footer values that are not UTF-8
    np.testing.assert_array_equal(compact.unpack_id_order(packed), order)


def _rows(rng, n: int, k: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Descending top-k log-probabilities with ties, -inf entries and a tail below -20."""
    values = np.sort(rng.normal(-8, 6, size=(n, k)), axis=1)[:, ::-1].astype(np.float32)
    values[0, 1:4] = values[0, 1]  # exact ties
    values[1, 2:] = -np.inf  # fewer finite logits than k
    values -= np.maximum(values[:, :1], 0)  # log-probabilities are at most 0
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
    return ids, values


@pytest.mark.parametrize("with_counts", [False, True])
def test_encode_decode_keeps_ids_and_the_bound(with_counts):
    rng = np.random.default_rng(1)
    k = 12
    ids, logprobs = _rows(rng, 300, k, 5000)
    counts = rng.integers(1, k + 1, size=300).astype(np.int32) if with_counts else None
    codes, deltas, order = compact.encode(ids, logprobs, counts)
    assert codes.type == deltas.type == compact.CODE_TYPE
    assert (deltas.values.to_numpy() >= 0).all()
    decoded = compact.decode(codes, deltas, order, k)
    kept = np.arange(k) < (counts if with_counts else np.full(300, k))[:, None]
    np.testing.assert_array_equal(decoded["topk_count"], kept.sum(axis=1))
    np.testing.assert_array_equal(decoded["topk_ids"][kept], ids[kept])  # lossless
    assert (decoded["topk_ids"][~kept] == -1).all()
    assert np.isneginf(decoded["topk_logprobs"][~kept]).all()
    stored, exact = decoded["topk_logprobs"][kept], logprobs[kept]
    assert (np.isneginf(stored) == np.isneginf(exact)).all()
    finite = np.isfinite(exact)
    error = np.abs(stored[finite].astype(np.float64) - exact[finite])
    high = exact[finite] >= -20
    assert error[high].max() <= 1 / 104 + 1e-6
    assert (error[~high] / -exact[finite][~high]).max() <= 1 / 255
    # Decoded rows stay in descending order, ties included.
    with np.errstate(invalid="ignore"):  # -inf - -inf
        rising = np.diff(decoded["topk_logprobs"], axis=1) > 0
    assert not rising[kept[:, 1:]].any()


def test_decode_without_ids_and_from_chunks():
    rng = np.random.default_rng(2)
    ids, logprobs = _rows(rng, 50, 6, 100)
    codes, deltas, order = compact.encode(ids, logprobs, None)
    chunked = pa.chunked_array([deltas.slice(0, 20), deltas.slice(20)])
    decoded = compact.decode(None, chunked, None)
    assert "topk_ids" not in decoded and decoded["topk_logprobs"].shape == (50, 6)
    whole = compact.decode(codes, deltas, order)
    np.testing.assert_array_equal(decoded["topk_logprobs"], whole["topk_logprobs"])
    sliced = compact.decode(codes.slice(10, 5), deltas.slice(10, 5), order)
    np.testing.assert_array_equal(sliced["topk_ids"], whole["topk_ids"][10:15])
    # rows of k entries read as (n, k) directly; asked wider, through the scatter: the same
    wider = compact.decode(codes, deltas, order, 8)
    np.testing.assert_array_equal(wider["topk_ids"][:, :6], whole["topk_ids"])
    np.testing.assert_array_equal(wider["topk_logprobs"][:, :6], whole["topk_logprobs"])
    assert (wider["topk_ids"][:, 6:] == -1).all() and np.isneginf(
        wider["topk_logprobs"][:, 6:]
    ).all()
