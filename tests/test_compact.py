"""The compact encoding: its error bound, lossless ids, ties and masked entries, its footer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lib.output import compact


def test_error_bound_down_to_the_wide_limit_and_beyond():
    logprobs = -np.concatenate(
        [
            np.linspace(0, 20, 200_001),
            np.linspace(20, 4096, 400_001),
            np.geomspace(4096, 1e30, 50_001),
        ]
    )
    decoded = compact.logprobs_from_codes(compact.logprob_codes(logprobs)).astype(np.float64)
    error = np.abs(decoded - logprobs)
    wide = logprobs >= -compact.WIDE_LIMIT
    assert error[logprobs >= -20].max() <= 1 / 104 + 1e-6  # half a step, in float32
    assert error[wide].max() <= 1 / 104 + 1.2e-4  # float32 holds -4096 to 2.4e-4
    assert error[wide].max() > 1 / 104 - 1e-4  # the bound is reached: the step is 1/52
    assert (error[~wide] / -logprobs[~wide]).max() <= 1 / 255
    # Codes never decrease as the log-probability falls: deltas along a row are never negative.
    assert (np.diff(compact.logprob_codes(logprobs).astype(np.int64)) >= 0).all()


def test_codes_of_version_1_still_decode():
    """Shards written before version 2 coded lp < -20 as one code per factor 1 + 1/128."""
    codes = np.array([0, 1040, 1041, 1040 + 128, 12_000], np.int32)
    expected = -np.array([0, 20, 20 * (1 + 1 / 128), 20 * (1 + 1 / 128) ** 128, 0])
    expected[-1] = -20 * (1 + 1 / 128) ** (12_000 - 1040)  # near the largest version 1 wrote
    np.testing.assert_allclose(compact.logprobs_from_codes(codes), expected, rtol=1e-6)
    assert compact.logprob_codes(np.array([-20.01, -1e4])).min() > 12_056  # no overlap


def test_token_logprobs_on_the_grid():
    values = np.array([-0.001, -3.14159, -45.678, -1e6 + 0.3, np.nan], np.float32)
    rounded = compact.round_token_logprobs(values)
    assert rounded.dtype == np.float32 and np.isnan(rounded[-1])
    np.testing.assert_array_equal(rounded[:-1] * 64, np.rint(rounded[:-1] * 64))
    assert (np.abs(rounded[:-1] - values[:-1].astype(np.float64)) <= 1 / 128).all()


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
    # every finite entry, the tail below -20 included: half a step, plus float32's own rounding
    assert (error <= 1 / 104 + np.spacing(np.abs(exact[finite]))).all()
    assert (exact[finite] < -20).any()
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
