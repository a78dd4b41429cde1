"""lib/extract/reduce.py against straightforward numpy: logsumexp, top-k, token log-probability and rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.extract import reduce
from lib.extract.reduce import ReduceSpec

VOCAB = 101
K = 7


def random_case(n: int = 37, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, VOCAB) float32 logits with no ties, and labels with some -1 (no token)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, VOCAB, generator=gen) * 4
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[::5] = -1
    return logits, labels


def numpy_stats(logits: np.ndarray, labels: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The same statistics computed the obvious way, in float64."""
    x = logits.astype(np.float64)
    peak = x.max(axis=1, keepdims=True)
    lse = (peak + np.log(np.exp(x - peak).sum(axis=1, keepdims=True)))[:, 0]
    order = np.argsort(-x, axis=1, kind="stable")[:, :k]
    safe = np.where(labels >= 0, labels, 0)
    token = x[np.arange(len(x)), safe]
    logp = x - lse[:, None]
    finite = np.isfinite(logp)  # p log p -> 0 as p -> 0
    logp_or_0 = np.where(finite, logp, 0)
    p = np.exp(logp)
    mean = (p * logp_or_0).sum(axis=1)
    return {
        "logsumexp": lse,
        "entropy": -mean,
        "logprob_std": np.sqrt((p * logp_or_0**2).sum(axis=1) - mean**2),
        "top1_logprob": logp.max(axis=1),
        "topk_ids": order,
        "topk_logits": np.take_along_axis(x, order, axis=1),
        "token_logprob": token - lse,
        "token_rank": (x > token[:, None]).sum(axis=1),
        "has_token": labels >= 0,
    }


def test_topk_mode_matches_numpy():
    logits, labels = random_case()
    out = reduce.reduce_logits(
        logits, labels, ReduceSpec(K, output_dtype=torch.float32, full=False)
    )
    want = numpy_stats(logits.numpy(), labels.numpy(), K)
    np.testing.assert_allclose(out["logsumexp"].numpy(), want["logsumexp"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["topk_ids"].numpy(), want["topk_ids"])
    np.testing.assert_allclose(out["topk_logits"].numpy(), want["topk_logits"], rtol=0, atol=1e-6)
    assert (np.diff(out["topk_logits"].numpy(), axis=1) < 0).all(), (
        "top-k must be strictly descending here"
    )
    np.testing.assert_array_equal(out["has_token"].numpy(), want["has_token"])
    has = want["has_token"]
    np.testing.assert_allclose(
        out["token_logprob"].numpy()[has], want["token_logprob"][has], rtol=0, atol=1e-5
    )
    np.testing.assert_array_equal(out["token_rank"].numpy()[has], want["token_rank"][has])
    for name in ("entropy", "top1_logprob"):
        np.testing.assert_allclose(out[name].numpy(), want[name], rtol=0, atol=1e-5)
    assert {name: value.dtype for name, value in out.items()} == {
        "logsumexp": torch.float32,
        "entropy": torch.float32,
        "top1_logprob": torch.float32,
        "token_logprob": torch.float32,
        "token_rank": torch.int32,
        "has_token": torch.bool,
        "topk_logits": torch.float32,
        "topk_ids": torch.int32,
    }
    assert "logits" not in out


def test_token_rank_counts_only_strictly_greater_entries():
    logits = torch.zeros(4, 10)
    # Token 1 ties with 2 and 3; only 0 and 9 beat it.
    logits[0] = torch.tensor([5.0, 1, 1, 1, 0, 0, 0, 0, 0, 2])
    logits[1] = torch.tensor([3.0, 3, 3, 1, 0, 0, 0, 0, 0, 0])  # token 2 ties the maximum: rank 0
    logits[2] = torch.full((10,), 7.0)  # every entry equal: rank 0, log-probability log(1/10)
    logits[3] = torch.arange(10.0)  # token 0 is the smallest: 9 entries above it
    labels = torch.tensor([1, 2, 5, 0])
    out = reduce.reduce_logits(
        logits, labels, ReduceSpec(3, output_dtype=torch.float32, full=False)
    )
    assert out["token_rank"].tolist() == [2, 0, 0, 9]
    assert out["token_logprob"][2].item() == pytest.approx(np.log(0.1), abs=1e-6)
    # A tie in the top-k keeps the value order exact even where the ids among equals are arbitrary.
    assert out["topk_logits"][1].tolist() == [3.0, 3.0, 3.0]
    assert sorted(out["topk_ids"][1].tolist()) == [0, 1, 2]


def test_no_token_rows_are_flagged():
    logits, _ = random_case(n=6)
    labels = torch.tensor([-1, 3, -1, -1, 0, VOCAB - 1])
    out = reduce.reduce_logits(
        logits, labels, ReduceSpec(K, output_dtype=torch.float16, full=False)
    )
    assert out["has_token"].tolist() == [False, True, False, False, True, True]
    # Labels of rows with a token are still computed correctly next to -1 rows.
    want = numpy_stats(logits.numpy(), labels.numpy(), K)
    np.testing.assert_allclose(
        out["token_logprob"].numpy()[[1, 4, 5]], want["token_logprob"][[1, 4, 5]], atol=1e-5
    )
    assert out["topk_logits"].dtype == torch.float16


def test_masked_vocabulary_entries():
    """-inf logits (masked vocabulary entries) neither count in the rank nor break logsumexp."""
    logits = torch.tensor([[2.0, -torch.inf, 1.0, -torch.inf], [-torch.inf, 0.5, 0.5, 3.0]])
    out = reduce.reduce_logits(
        logits, torch.tensor([2, 1]), ReduceSpec(2, output_dtype=torch.float32, full=False)
    )
    assert out["token_rank"].tolist() == [1, 1]
    lse = [np.log(np.exp(2.0) + np.exp(1.0)), np.log(2 * np.exp(0.5) + np.exp(3.0))]
    np.testing.assert_allclose(out["logsumexp"].numpy(), lse, rtol=1e-6)
    np.testing.assert_allclose(
        out["token_logprob"].numpy(), [1.0 - lse[0], 0.5 - lse[1]], rtol=1e-6
    )
    assert out["topk_ids"].tolist() == [[0, 2], [3, 1]] or out["topk_ids"].tolist() == [
        [0, 2],
        [3, 2],
    ]


class CountingHead(torch.nn.Module):
    """A linear head that counts its calls, to prove the chunked path really ran in chunks."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, vocab, bias=False)
        self.calls: list[int] = []

    def forward(self, states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(states.shape[0])
        logits = self.linear(states)
        return logits if out is None else out.copy_(logits)


@pytest.mark.parametrize("full", [False, True], ids=["topk", "full"])
def test_chunked_reduce_equals_one_chunk(full):
    torch.manual_seed(0)
    head = CountingHead(16, VOCAB)
    states = torch.randn(50, 16)
    labels = torch.randint(0, VOCAB, (50,))
    labels[7] = -1
    with torch.inference_mode():
        spec = ReduceSpec(K, torch.float32, full)
        settings = dict(vocab_size=VOCAB)
        whole = reduce.reduce_states(head, states, labels, spec, chunk_bytes=2**30, **settings)
        assert head.calls == [50]
        head.calls.clear()
        # Room for 3 positions' float32 logits per chunk: 17 chunks, the last one of 2 positions.
        chunked = reduce.reduce_states(
            head, states, labels, spec, chunk_bytes=3 * 4 * VOCAB, **settings
        )
    assert head.calls == [3] * 16 + [2]
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert chunked[name].shape == whole[name].shape, name
        assert chunked[name].dtype == whole[name].dtype, name
        if whole[name].is_floating_point():
            torch.testing.assert_close(chunked[name], whole[name], rtol=0, atol=1e-5)
        else:
            assert torch.equal(chunked[name], whole[name]), name


@pytest.mark.parametrize("full", [False, True], ids=["topk", "full"])
def test_entropy_and_spread_match_float64_with_masked_entries(full):
    """Entropy and the std of log p (Min-K%++) over the vocabulary, through the chunked path
    that reuses its buffers; entries at -inf (masked tokens) add nothing and make no nan."""
    torch.manual_seed(1)
    head = CountingHead(16, VOCAB)
    states = torch.randn(40, 16)
    labels = torch.randint(0, VOCAB, (40,))

    def masked(chunk, out=None):
        return head(chunk, out).index_fill_(1, torch.tensor([3, 50]), -torch.inf)

    with torch.inference_mode():
        spec = ReduceSpec(K, torch.float32, full, moments=True)
        out = reduce.reduce_states(
            masked, states, labels, spec, vocab_size=VOCAB, chunk_bytes=3 * 4 * VOCAB
        )
        logits = masked(states).numpy()
    want = numpy_stats(logits, labels.numpy(), K)
    for name in ("entropy", "logprob_std", "top1_logprob", "token_logprob", "logsumexp"):
        assert np.isfinite(out[name].numpy()).all(), name
        np.testing.assert_allclose(out[name].numpy(), want[name], rtol=0, atol=2e-5, err_msg=name)
    assert (out["entropy"].numpy() > 0).all()


def test_no_topk_keeps_the_other_statistics():
    """k=0 (document scores only): no top-k columns, the rest as with a top-k."""
    logits, labels = random_case()
    with_topk = reduce.reduce_logits(
        logits.clone(), labels, ReduceSpec(K, output_dtype=torch.float32, full=False)
    )
    without = reduce.reduce_logits(
        logits.clone(), labels, ReduceSpec(0, output_dtype=torch.float32, full=False)
    )
    assert set(with_topk) - set(without) == {"topk_ids", "topk_logits"}
    for name, value in without.items():
        torch.testing.assert_close(value, with_topk[name], rtol=0, atol=0)


def test_chunk_positions():
    assert reduce.chunk_positions(1000, chunk_bytes=4 * 1000 * 5) == 5
    assert reduce.chunk_positions(1000, chunk_bytes=4 * 1000 * 5 + 3999) == 5
    assert reduce.chunk_positions(128_000, chunk_bytes=1000) == 1  # never zero positions
    assert reduce.chunk_positions(32_000, chunk_bytes=2**20) == 8


def test_bfloat16_logits_give_float32_statistics():
    logits, labels = random_case(n=20, seed=1)
    # Large values, where bfloat16 arithmetic would be coarse.
    low = (logits * 10).to(torch.bfloat16)
    out = reduce.reduce_logits(low, labels, ReduceSpec(K, output_dtype=torch.float32, full=False))
    exact = numpy_stats(low.float().numpy(), labels.numpy(), K)
    assert out["logsumexp"].dtype == torch.float32 and out["token_logprob"].dtype == torch.float32
    np.testing.assert_allclose(out["logsumexp"].numpy(), exact["logsumexp"], rtol=0, atol=1e-4)
    has = exact["has_token"]
    np.testing.assert_allclose(
        out["token_logprob"].numpy()[has], exact["token_logprob"][has], rtol=0, atol=1e-4
    )
    # The top-k values are the bfloat16 logits themselves, upcast without rounding.
    np.testing.assert_array_equal(
        out["topk_logits"].numpy(), exact["topk_logits"].astype(np.float32)
    )
    # bfloat16 logsumexp would be off by far more than float32 rounding.
    coarse = torch.logsumexp(low, dim=-1).float().numpy()
    assert np.abs(coarse - exact["logsumexp"]).max() > 1e-2


@pytest.mark.parametrize("output_dtype", [torch.float16, torch.float32])
def test_full_mode_returns_logits_in_output_dtype(output_dtype):
    logits, labels = random_case(n=9, seed=2)
    low = logits.to(torch.bfloat16)
    out = reduce.reduce_logits(low, labels, ReduceSpec(K, output_dtype=output_dtype, full=True))
    assert out["logits"].dtype == output_dtype
    assert out["logits"].shape == (9, VOCAB)
    assert torch.equal(out["logits"], low.float().to(output_dtype))
    assert "topk_ids" not in out and "topk_logits" not in out
    assert out["logsumexp"].dtype == torch.float32


@pytest.mark.parametrize("full", [False, True], ids=["topk", "full"])
def test_empty_input(full):
    head = torch.nn.Linear(16, VOCAB, bias=False)
    with torch.inference_mode():
        out = reduce.reduce_states(
            head,
            torch.zeros(0, 16),
            torch.zeros(0, dtype=torch.long),
            ReduceSpec(k=K, output_dtype=torch.float16, full=full),
            vocab_size=VOCAB,
            chunk_bytes=4 * VOCAB,
        )
    assert (
        out["logsumexp"].shape == (0,)
        and out["token_rank"].shape == (0,)
        and out["has_token"].shape == (0,)
    )
    if full:
        assert out["logits"].shape == (0, VOCAB) and out["logits"].dtype == torch.float16
    else:
        assert out["topk_ids"].shape == (0, K) and out["topk_logits"].shape == (0, K)


def test_full_logits_stream_into_a_host_buffer():
    """With `logits_out`, every chunk's logits land in the caller's buffer, equal to concatenation."""
    torch.manual_seed(3)
    states = torch.randn(23, 8)
    weight = torch.randn(50, 8)
    labels = torch.randint(-1, 50, (23,))

    def head(x, out=None):
        return x @ weight.T

    spec = ReduceSpec(4, torch.float16, full=True)
    kwargs = dict(vocab_size=50, chunk_bytes=4 * 50 * 5)
    plain = reduce.reduce_states(head, states, labels, spec, **kwargs)
    buffer = torch.full((23, 50), float("nan"), dtype=torch.float16)
    streamed = reduce.reduce_states(head, states, labels, spec, logits_out=buffer, **kwargs)
    assert streamed["logits"] is buffer
    assert torch.equal(buffer, plain["logits"])
    for name in ("logsumexp", "token_logprob", "token_rank", "has_token"):
        assert torch.equal(streamed[name], plain[name]), name


def test_without_tokens_the_other_statistics_are_unchanged():
    """`tokens=False` (seq2seq start mode) skips the rank pass and changes nothing else."""
    torch.manual_seed(4)
    logits = torch.randn(9, 40)
    labels = torch.full((9,), -1)
    full = reduce.reduce_logits(
        logits, labels, ReduceSpec(5, output_dtype=torch.float32, full=False)
    )
    lean = reduce.reduce_logits(
        logits, labels, ReduceSpec(5, output_dtype=torch.float32, full=False), tokens=False
    )
    for name in ("logsumexp", "topk_ids", "topk_logits", "has_token"):
        assert torch.equal(full[name], lean[name]), name
    assert lean["token_rank"].dtype == torch.int32 and not lean["has_token"].any()


@pytest.mark.parametrize("vocab", [64 * 40, 64 * 40 + 17, 32128])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_by_blocks_equals_topk(vocab, k):
    """The block pass returns torch.topk's values, and ids that hold them, on awkward rows too."""
    gen = torch.Generator().manual_seed(vocab + k)
    logits = torch.randn(40, vocab, generator=gen) * 3
    logits[1, 128 : 128 + k] = 100 + torch.arange(k, dtype=torch.float32)  # all in one block
    logits[2, -3:] = torch.tensor([50.0, 51.0, 52.0])  # the winners in the last block
    logits[3, ::2] = float("-inf")  # masked vocabulary entries
    logits[4] = 0.0  # every entry tied
    logits[5, 7::64] = 9.0  # one tied winner per block
    values, ids = reduce.topk_by_blocks(logits, k)
    expected_values, expected_ids = logits.topk(k, dim=-1)
    assert torch.equal(values, expected_values)
    assert torch.equal(logits.gather(1, ids), values)
    assert all(len(set(row)) == k for row in ids.tolist()), "an id came back twice"
    untied = [0, 1, 2, 3] + list(range(6, 40))
    assert torch.equal(ids[untied], expected_ids[untied])


def test_topk_by_blocks_small_vocabulary_is_plain_topk():
    logits, _ = random_case()
    values, ids = reduce.topk_by_blocks(logits, K)
    assert torch.equal(ids, logits.topk(K, dim=-1).indices) and values.shape == (len(logits), K)


@pytest.mark.parametrize("vocab", [2561, 50257])
def test_topk_by_blocks_rows_with_fewer_than_k_finite_logits(vocab):
    """Filler slots past the vocabulary never come back as ids, even among -inf ties."""
    logits = torch.full((3, vocab), float("-inf"))
    logits[0, -1] = 0.0  # one finite entry, in the short last block
    logits[1, :5] = torch.arange(5.0)
    # row 2 stays all -inf
    values, ids = reduce.topk_by_blocks(logits, 20)
    assert torch.equal(values, logits.topk(20, dim=-1).values)
    assert int(ids.max()) < vocab
    assert ids[0, 0] == vocab - 1 and ids[1, :5].tolist() == [4, 3, 2, 1, 0]


def float64_kept(logits: np.ndarray, k: int, top_p: float, min_k: int) -> tuple:
    """Per row, from the whole sorted row in float64: the kept count, the kept mass, and how
    close the nearest prefix mass lies to top_p (where float32 may decide either way)."""
    x = logits.astype(np.float64)
    peak = x.max(axis=1, keepdims=True)
    logp = x - peak - np.log(np.exp(x - peak).sum(axis=1, keepdims=True))
    mass = np.cumsum(np.exp(-np.sort(-logp, axis=1)[:, :k]), axis=1)
    count = np.clip((mass < top_p).sum(axis=1) + 1, min_k, k)
    return count, mass[np.arange(len(x)), count - 1], np.abs(mass - top_p).min(axis=1)


@pytest.mark.parametrize("top_p,min_k", [(0.9, 1), (0.5, 3), (0.999, 2)])
def test_kept_counts_equal_float64_sorted_logits(top_p, min_k):
    """The kept prefix: the shortest reaching top_p in mass, clamped to [min_k, k], counted as
    float64 counts it from the whole row, except within float32's reach of the threshold."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 2000, generator=gen) * torch.rand(300, 1, generator=gen) * 8
    logits[:5, 10:] = -torch.inf  # fewer finite logits than k (the rest has no mass)
    logits[5, :40] = 3.0  # ties across the threshold
    k = 32
    out = reduce.reduce_logits(
        logits,
        torch.zeros(300, dtype=torch.long),
        ReduceSpec(k, output_dtype=torch.float32, full=False, top_p=top_p, min_k=min_k),
    )
    count, mass, margin = float64_kept(logits.numpy(), k, top_p, min_k)
    got = out["topk_count"].numpy()
    assert out["topk_count"].dtype == torch.int32 and got.min() >= min_k and got.max() <= k
    near = margin < 1e-5
    np.testing.assert_array_equal(got[~near], count[~near])
    assert (np.abs(got[near] - count[near]) <= 1).all()
    # The kept entries hold the float64 mass of the kept prefix (ties swap equal values only).
    lse = out["logsumexp"].numpy().astype(np.float64)[:, None]
    stored = np.exp(out["topk_logits"].numpy().astype(np.float64) - lse)
    kept_mass = np.where(np.arange(k) < got[:, None], stored, 0).sum(axis=1)
    np.testing.assert_allclose(kept_mass[~near], mass[~near], atol=1e-5)
    assert 1 < got.mean() < k  # the counts vary


def test_top_p_one_keeps_no_count():
    logits, labels = random_case()
    assert "topk_count" not in reduce.reduce_logits(
        logits, labels, ReduceSpec(K, output_dtype=torch.float32, full=False)
    )
    full = reduce.reduce_logits(
        logits, labels, ReduceSpec(K, output_dtype=torch.float32, full=True, top_p=0.5)
    )
    assert "topk_count" not in full


@pytest.mark.parametrize("moments", [False, True], ids=["tokens", "documents"])
def test_teacher_columns_through_reused_buffers_match_float64(moments):
    """Probes, logsumexp at T (1 among them), and samples at T = 0.7 through the chunked path,
    whose spare buffer the moments reuse afterwards; a masked entry is never drawn."""
    torch.manual_seed(3)
    head = CountingHead(16, VOCAB)
    states, labels = torch.randn(40, 16), torch.randint(0, VOCAB, (40,))
    spec = ReduceSpec(
        K,
        torch.float32,
        moments=moments,
        probes=(3, 50),
        temperatures=(0.5, 1.0, 3.0),
        samples=9,
        sample_temperature=0.7,
    )
    assert spec.teacher and spec.teacher_buffer
    keys = torch.arange(40, dtype=torch.int64) * 7919

    def masked(chunk, out=None):
        logits = head(chunk, out=out)
        logits[:, 11] = -float("inf")
        return logits

    with torch.inference_mode():
        got = reduce.reduce_states(
            masked, states, labels, spec, vocab_size=VOCAB, chunk_bytes=3 * 4 * VOCAB, keys=keys
        )
        x = masked(states).double()
    assert len(head.calls) > 10  # chunked, buffers reused
    logp = x.log_softmax(-1)
    torch.testing.assert_close(got["probe_logprobs"].double(), logp[:, [3, 50]], atol=1e-5, rtol=0)
    expected = torch.stack([torch.logsumexp(x / t, -1) for t in (0.5, 1.0, 3.0)], 1)
    torch.testing.assert_close(got["logsumexp_t"].double(), expected, atol=1e-5, rtol=0)
    drawn = got["sample_ids"].long()
    assert got["sample_ids"].dtype == torch.int32 and 11 not in drawn.tolist()
    at_t = (x / 0.7).log_softmax(-1).gather(1, drawn)
    torch.testing.assert_close(got["sample_logprobs"].double(), at_t, atol=1e-5, rtol=0)
    plain = ReduceSpec(K, torch.float32, moments=moments)
    with torch.inference_mode():
        without = reduce.reduce_states(masked, states, labels, plain, vocab_size=VOCAB)
    for name in without:  # the other statistics are the same with or without the teacher's
        torch.testing.assert_close(got[name], without[name], atol=1e-5, rtol=0)
