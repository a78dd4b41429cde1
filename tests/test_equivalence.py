"""The core contract: batched, padded, bucketed output equals an unbatched, unpadded forward."""

from __future__ import annotations

import pandas as pd
import pyarrow.dataset as ds
import pytest

from jobs import extract
from lib import results, sample
from lib.extract import batching
from tests.conftest import write_rows
from tests.reference import assert_matches, assert_topk_storage, read_corpus, reference_rows

CASES = [
    # model, reference mode, overrides
    ("t5", "start", ["decoder.mode=start"]),
    ("t5", "targets", ["decoder.mode=targets", "input.target_column=target"]),
    ("t5", "generate", ["decoder.mode=generate", "decoder.max_new_tokens=6"]),
    ("gpt2", "causal", []),
    ("llama", "causal", []),
    ("gpt2", "continuation", ["input.target_column=target"]),
    ("llama", "continuation", ["input.target_column=target"]),
]


def run(
    tmp_path, model_dir: str, corpus: str, overrides: list[str], name: str = "out"
) -> pd.DataFrame:
    out = tmp_path / name
    argv = [
        f"model.path={model_dir}",
        f"input.path={corpus}",
        "input.id_column=doc_id",
        f"output.dir={out}",
        "output.dtype=float32",
        "output.k=5",
        "model.dtype=float32",
        *overrides,
    ]
    assert extract.main(argv) == 0
    frame = ds.dataset(out, format="arrow" if "output.format=arrow" in overrides else "parquet")
    return frame.to_table().to_pandas().sort_values(["id", "position"]).reset_index(drop=True)


# Cases run with widths padded to a multiple of 8, as on a GPU (a CPU pads to the longest row),
# so that every row of a batch, the longest too, has padding after it.
PADDED_AS_ON_A_GPU = {
    ("t5", "start"),
    ("t5", "generate"),
    ("llama", "causal"),
    ("gpt2", "continuation"),
}


@pytest.mark.parametrize("model,mode,overrides", CASES, ids=[f"{m}-{mode}" for m, mode, _ in CASES])
def test_rows_equal_unbatched_forward(
    tmp_path, monkeypatch, model_dirs, corpus, model, mode, overrides
):
    if (model, mode) in PADDED_AS_ON_A_GPU:
        monkeypatch.setattr(batching, "pad_multiple_for", lambda device: batching.PAD_MULTIPLE)
    # Small token budgets force many batches of mixed sizes; max_length forces truncation.
    settings = [
        "batching.max_tokens=96",
        "input.max_length=24",
        "input.prefix=say: ",
        "output.shard_rows=17",
    ]
    result = run(tmp_path, model_dirs[model], corpus, settings + overrides)
    reference = reference_rows(
        model_dirs[model],
        read_corpus(corpus),
        mode,
        prefix="say: ",
        max_length=24,
        max_new_tokens=6,
    )
    assert_matches(result, reference, k=5)


@pytest.mark.parametrize(
    "model,mode,overrides", [CASES[1], CASES[4]], ids=["t5-targets", "llama-causal"]
)
def test_full_logits_equal_unbatched_forward(tmp_path, model_dirs, corpus, model, mode, overrides):
    settings = [
        "batching.max_tokens=128",
        "input.max_length=20",
        "output.logits=full",
        "output.format=arrow",
    ]
    result = run(tmp_path, model_dirs[model], corpus, settings + overrides)
    reference = reference_rows(model_dirs[model], read_corpus(corpus), mode, max_length=20)
    assert_matches(result, reference, k=5, full=True)


def test_batching_does_not_change_results(tmp_path, model_dirs, corpus):
    """One row per batch and one large batch give the same rows, in the same order."""
    base = ["input.max_length=32"]
    small = run(tmp_path, model_dirs["gpt2"], corpus, base + ["batching.max_tokens=8"], "small")
    large = run(
        tmp_path, model_dirs["gpt2"], corpus, base + ["batching.max_tokens=100000"], "large"
    )
    pd.testing.assert_frame_equal(
        small.drop(columns=["topk_logits", "topk_ids", "token_logprob", "logsumexp"]),
        large.drop(columns=["topk_logits", "topk_ids", "token_logprob", "logsumexp"]),
    )
    assert (small["logsumexp"] - large["logsumexp"]).abs().max() < 1e-4


def test_float16_storage_is_close(tmp_path, model_dirs, corpus):
    result = run(
        tmp_path, model_dirs["t5"], corpus, ["output.dtype=float16", "input.max_length=16"]
    )
    reference = reference_rows(model_dirs["t5"], read_corpus(corpus), "start", max_length=16)
    for rec in result.itertuples(index=False):
        _, logits = reference[(rec.id, rec.position)]
        top = sorted(logits, reverse=True)[:5]
        assert max(abs(a - b) for a, b in zip(rec.topk_logits, top, strict=False)) < 1e-2


@pytest.fixture(scope="module")
def peaked_case(tmp_path_factory, peaked_dir) -> tuple[str, dict]:
    """A small corpus and the peaked 32k model's unbatched forward on it."""
    root = tmp_path_factory.mktemp("peaked-corpus")
    texts = sample.generate_texts(24, seed=31, mean_words=7)
    corpus = write_rows(root / "corpus.parquet", texts, ids=[f"p{i:02d}" for i in range(24)])
    return corpus, reference_rows(peaked_dir, read_corpus(corpus), "causal", max_length=16)


@pytest.mark.parametrize("encoding,top_p", [("compact", 1.0), ("compact", 0.95), ("plain", 0.95)])
def test_topk_storage_equals_unbatched_forward(tmp_path, peaked_dir, peaked_case, encoding, top_p):
    """k = 64 on a 32k vocabulary with peaked distributions, min_k = 2: each row keeps exactly
    the required entries, ids are lossless, and every stored log-probability is within the
    bound (compact: half its 1/52-nat step; plain float32: exact)."""
    corpus, reference = peaked_case
    settings = [
        "batching.max_tokens=64",
        "input.max_length=16",
        "output.shard_rows=7",
        "output.k=64",
        f"output.encoding={encoding}",
        f"output.top_p={top_p}",
        "output.min_k=2",
    ]
    run(tmp_path, peaked_dir, corpus, settings)
    arrays = results.load_arrays(tmp_path / "out")
    bound = 1 / 104 + 1e-4 if encoding == "compact" else 1e-4
    assert_topk_storage(arrays, reference, 64, top_p=top_p, min_k=2, bound=bound)
    if top_p < 1:
        assert 2 <= arrays["topk_count"].mean() < 40  # peaked: most rows keep few entries
