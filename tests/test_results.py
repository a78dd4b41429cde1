"""Readers in lib.results return the same numbers as pandas reading the shards directly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import torch
from transformers import AutoTokenizer

from jobs import extract
from lib import results
from lib.errors import UserError
from tests.reference import read_corpus

MAX_LENGTH = 12
# name -> (model, overrides); small shards so every output has several of them.
JOBS = {
    "parquet-topk": ("gpt2", ["input.id_column=doc_id", "output.dtype=float32", "output.k=5"]),
    "arrow-full": (
        "t5",
        [
            "input.id_column=doc_id",
            "decoder.mode=targets",
            "input.target_column=target",
            "output.logits=full",
            "output.format=arrow",
            "output.dtype=float32",
        ],
    ),
    "no-id-float16": ("llama", ["output.dtype=float16", "output.k=4"]),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, model_dirs, corpus) -> dict[str, str]:
    """Run each job once for the module; name -> output dir."""
    root = tmp_path_factory.mktemp("results")
    dirs = {}
    for name, (model, overrides) in JOBS.items():
        out = root / name
        argv = [
            f"model.path={model_dirs[model]}",
            f"input.path={corpus}",
            f"output.dir={out}",
            f"input.max_length={MAX_LENGTH}",
            "output.shard_rows=17",
            "model.dtype=float32",
            *overrides,
        ]
        assert extract.main(argv) == 0
        dirs[name] = str(out)
    return dirs


def direct_frame(out_dir: str) -> pd.DataFrame:
    """What pandas gives without any helper: `pd.read_parquet`, or the Arrow dataset."""
    if results.output_format(out_dir) == "parquet":
        return pd.read_parquet(out_dir)
    return ds.dataset(out_dir, format="arrow").to_table().to_pandas()


def stack(frame: pd.DataFrame, name: str) -> np.ndarray:
    return np.stack(frame[name].to_numpy())


@pytest.mark.parametrize("name", list(JOBS))
def test_load_frame_equals_pandas(outputs, name):
    expected = direct_frame(outputs[name])
    pd.testing.assert_frame_equal(results.load_frame(outputs[name]), expected)
    subset = results.load_frame(outputs[name], columns=["id", "logsumexp"])
    pd.testing.assert_frame_equal(subset, expected[["id", "logsumexp"]])


@pytest.mark.parametrize("name", list(JOBS))
def test_load_arrays_equal_pandas(outputs, name):
    frame = direct_frame(outputs[name])
    arrays = results.load_arrays(outputs[name])
    n = len(frame)
    assert n > 100 and all(len(values) == n for values in arrays.values())
    assert arrays["id"].tolist() == frame["id"].tolist()
    assert arrays["id"].dtype.kind == ("i" if name == "no-id-float16" else "U")
    assert arrays["position"].dtype == np.int32
    np.testing.assert_array_equal(arrays["position"], frame["position"].to_numpy())

    # Nulls: pandas gives NaN; the arrays give -1 (ints), NaN (floats) and has_token False.
    missing = frame["token_id"].isna().to_numpy()
    if name != "arrow-full":  # causal: the last position has no next token
        assert missing.sum() > 10
    np.testing.assert_array_equal(arrays["has_token"], ~missing)
    for column, fill in (("token_id", -1), ("token_rank", -1)):
        assert arrays[column].dtype == np.int32
        np.testing.assert_array_equal(arrays[column], frame[column].fillna(fill).to_numpy())
    assert arrays["token_logprob"].dtype == np.float32
    np.testing.assert_array_equal(arrays["token_logprob"], frame["token_logprob"].to_numpy())
    assert np.isnan(arrays["token_logprob"][missing]).all()
    np.testing.assert_array_equal(arrays["logsumexp"], frame["logsumexp"].to_numpy())

    columns = ["logits"] if name == "arrow-full" else ["topk_ids", "topk_logits"]
    for column in columns:
        expected = stack(frame, column)
        assert arrays[column].dtype == expected.dtype and arrays[column].shape == expected.shape
        np.testing.assert_array_equal(arrays[column], expected)
    if name == "arrow-full":
        assert arrays["logits"].dtype == np.float32
        assert (
            arrays["logits"].shape[1] > 300
        )  # the model's output vocabulary, beyond the tokenizer
    else:
        k = 4 if name == "no-id-float16" else 5
        dtype = np.float16 if name == "no-id-float16" else np.float32
        assert arrays["topk_ids"].shape == (n, k) and arrays["topk_logits"].dtype == dtype
        assert (np.diff(arrays["topk_logits"].astype(np.float32), axis=1) <= 0).all()


@pytest.mark.parametrize("name", list(JOBS))
def test_iter_examples_covers_every_row_once(outputs, name):
    frame = direct_frame(outputs[name])
    by_key = frame.set_index(["id", "position"])["logsumexp"]
    seen_ids, keys = [], []
    for example_id, rows in results.iter_examples(outputs[name]):
        seen_ids.append(example_id)
        assert (np.diff(rows["position"]) > 0).all()  # sorted, no repeats
        assert all(len(values) == len(rows["position"]) for values in rows.values())
        example_keys = [(example_id, int(p)) for p in rows["position"]]
        np.testing.assert_array_equal(rows["logsumexp"], by_key.loc[example_keys].to_numpy())
        keys += example_keys
    assert len(seen_ids) == len(set(seen_ids)) == frame["id"].nunique()
    assert len(keys) == len(set(keys)) == len(frame)
    assert set(keys) == set(zip(frame["id"], frame["position"], strict=True))


def test_iter_examples_in_input_order_for_topk(outputs):
    ids = [example_id for example_id, _ in results.iter_examples(outputs["no-id-float16"])]
    assert ids == sorted(ids)  # row-index ids: input order


@pytest.mark.parametrize("name", list(JOBS))
def test_to_torch(outputs, name):
    frame = direct_frame(outputs[name])
    tensors = results.to_torch(outputs[name])
    assert results.to_torch(results.load_arrays(outputs[name])).keys() == tensors.keys()
    mask = tensors["token_mask"]
    assert mask.dtype == torch.bool
    assert mask.tolist() == frame["token_id"].notna().tolist()
    assert tensors["token_id"].dtype == torch.int64
    assert tensors["token_id"][mask].tolist() == frame["token_id"].dropna().astype(int).tolist()
    assert (tensors["token_id"][~mask] == -1).all()
    assert tensors["logsumexp"].dtype == torch.float32
    assert ("id" in tensors) == (name == "no-id-float16")
    if name == "arrow-full":
        logits = tensors["logits"]
        assert logits.dtype == torch.float32
        np.testing.assert_array_equal(logits.numpy(), stack(frame, "logits"))
        # The stored logsumexp is over the whole stored row, so log_softmax recovers token_logprob.
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs[mask].gather(1, tensors["token_id"][mask].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(chosen, tensors["token_logprob"][mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            tensors["logsumexp"], torch.logsumexp(logits, dim=-1), atol=1e-5, rtol=0
        )
        return
    ids, values = tensors["topk_ids"], tensors["topk_logits"]
    assert ids.dtype == torch.int64 and values.dtype == torch.float32
    np.testing.assert_array_equal(ids.numpy(), stack(frame, "topk_ids"))
    np.testing.assert_array_equal(values.numpy(), stack(frame, "topk_logits").astype(np.float32))
    # Where the actual token is in the top-k, its top-k log-probability is its token_logprob.
    logprobs = results.topk_logprobs(values, tensors["logsumexp"])
    torch.testing.assert_close(logprobs, tensors["topk_logprobs"])
    hit = (ids == tensors["token_id"].unsqueeze(1)) & mask.unsqueeze(1)
    rows = hit.any(dim=1)
    # The token is in the top-k exactly when fewer than k entries score higher than it.
    assert rows.tolist() == (mask & (tensors["token_rank"] < ids.shape[1])).tolist()
    assert rows.sum() > 5
    atol = 2e-3 if name == "no-id-float16" else 1e-5  # float16 storage rounds the logits
    torch.testing.assert_close(logprobs[hit], tensors["token_logprob"][rows], atol=atol, rtol=0)
    # numpy in, numpy out, same numbers.
    arrays = results.load_arrays(outputs[name])
    np_logprobs = results.topk_logprobs(arrays["topk_logits"], arrays["logsumexp"])
    assert np_logprobs.dtype == np.float32
    np.testing.assert_array_equal(np_logprobs, logprobs.numpy())


def check_join(joined: pd.DataFrame, model_dir: str) -> None:
    """Joined texts are the right ones: tokenizing each gives back the example's stored tokens."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    for _, rows in joined.groupby("id", sort=False):
        text = rows["text"].iloc[0]
        assert (rows["text"] == text).all()
        tokens = tok(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        # causal: row p's token_id is the token at p + 1, null after the last one
        stored = rows.sort_values("position")["token_id"].dropna().astype(int).tolist()
        assert stored == tokens[1:]


def test_join_input_by_row_index(outputs, model_dirs, corpus):
    out = outputs["no-id-float16"]
    joined = results.join_input(out)
    frame = results.load_frame(out)
    pd.testing.assert_frame_equal(joined.drop(columns=["text"]), frame)
    # The id is the global row index over the input files in sorted path order.
    texts = read_corpus(corpus)["text"].tolist()
    assert joined["text"].tolist() == [texts[i] for i in joined["id"]]
    check_join(joined, model_dirs["llama"])
    explicit = results.join_input(out, corpus, columns=["text", "doc_id"])
    assert (explicit["doc_id"] == [f"row-{i:03d}" for i in explicit["id"]]).all()


def test_join_input_by_id_column(outputs, model_dirs, corpus):
    joined = results.join_input(outputs["parquet-topk"])
    assert list(joined.columns)[-1] == "text" and joined["text"].notna().all()
    check_join(joined, model_dirs["gpt2"])
    both = results.join_input(outputs["arrow-full"])  # the job's target column comes along
    source = read_corpus(corpus).set_index("doc_id")
    assert both["target"].tolist() == source.loc[both["id"], "target"].tolist()


def test_format_from_files_without_manifest(outputs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(outputs["arrow-full"], copy)
    (copy / "_manifest.json").unlink()
    assert results.output_format(copy) == "arrow"
    pd.testing.assert_frame_equal(results.load_frame(copy), direct_frame(outputs["arrow-full"]))
    with pytest.raises(UserError, match="input_path"):
        results.join_input(copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no part-"):
        results.load_frame(empty)


@pytest.fixture(scope="module")
def top_p_outputs(tmp_path_factory, peaked_dir, corpus) -> dict[str, Path]:
    """One top_p job of the peaked 32k model in both encodings: plain (float32, padded k-wide
    rows) and compact."""
    root = tmp_path_factory.mktemp("top-p")
    outputs = {}
    for encoding in ("plain", "compact"):
        out = root / encoding
        argv = [
            f"model.path={peaked_dir}",
            f"input.path={corpus}",
            f"output.dir={out}",
            f"input.max_length={MAX_LENGTH}",
            "input.id_column=doc_id",
            "output.shard_rows=17",
            "output.dtype=float32",
            "output.k=8",
            "output.top_p=0.8",
            "output.min_k=2",
            f"output.encoding={encoding}",
        ]
        assert extract.main(argv) == 0
        outputs[encoding] = out
    return outputs


def test_compact_reads_as_plain_within_its_bound(top_p_outputs):
    plain = results.load_arrays(top_p_outputs["plain"])
    compact = results.load_arrays(top_p_outputs["compact"])
    assert set(compact) == set(plain) - {"topk_logits"}
    for name in ("id", "position", "has_token", "token_id", "token_rank", "logsumexp"):
        np.testing.assert_array_equal(compact[name], plain[name], err_msg=name)
    counts = plain["topk_count"]
    assert counts.min() >= 2 and counts.max() <= 8 and len(set(counts)) > 2
    np.testing.assert_array_equal(compact["topk_count"], counts)
    np.testing.assert_array_equal(compact["topk_ids"], plain["topk_ids"])  # -1 past the count
    kept = np.arange(8) < counts[:, None]
    assert np.isneginf(plain["topk_logprobs"][~kept]).all()
    assert np.isneginf(compact["topk_logprobs"][~kept]).all()
    error = np.abs(compact["topk_logprobs"][kept] - plain["topk_logprobs"][kept])
    assert error.max() <= 1 / 104 + 8e-6  # half a step, plus float32's rounding down to -64
    # token_logprob on a 1/64-nat grid (missing where plain's is), the entropy in float16
    assert compact["token_logprob"].dtype == compact["entropy"].dtype == np.float32
    missing = np.isnan(plain["token_logprob"])
    assert missing.any() and (np.isnan(compact["token_logprob"]) == missing).all()
    token_error = np.abs(compact["token_logprob"] - plain["token_logprob"])[~missing]
    assert token_error.max() <= 1 / 128 + 1e-5 and token_error.max() > 1e-4
    assert (
        compact["token_logprob"][~missing] * 64 == np.rint(plain["token_logprob"][~missing] * 64)
    ).all()
    np.testing.assert_allclose(compact["entropy"], plain["entropy"], rtol=2**-11, atol=0)


def test_compact_through_every_reader(top_p_outputs, tmp_path):
    import duckdb
    import polars as pl

    out = top_p_outputs["compact"]
    arrays = results.load_arrays(out)
    tensors = results.to_torch(out)
    assert tensors["topk_ids"].dtype == torch.int64 and tensors["topk_count"].dtype == torch.int64
    assert (tensors["topk_ids"] == -1).any() and torch.isneginf(tensors["topk_logprobs"]).any()
    np.testing.assert_array_equal(tensors["topk_logprobs"].numpy(), arrays["topk_logprobs"])
    # One example at a time, decoded with its own shard's id order.
    rows = [rows for _, rows in results.iter_examples(out)]
    for name in ("topk_ids", "topk_logprobs", "topk_count"):
        joined = np.concatenate([r[name] for r in rows])
        np.testing.assert_array_equal(joined, arrays[name])  # top-k rows are in input order
    subset = results.load_arrays(out, columns=["id", "position", "topk_ids"])
    np.testing.assert_array_equal(subset["topk_ids"], arrays["topk_ids"])
    assert "logsumexp" not in subset
    # The stored columns load with one plain call, as every encoding does.
    frame = pd.read_parquet(out / "tokens")
    assert len(frame) == len(arrays["id"]) and "topk_id_codes" in frame.columns
    assert pl.read_parquet(out / "tokens" / "*.parquet").height == len(frame)
    query = f"SELECT count(*), sum(len(topk_id_codes)) FROM '{out}/tokens/*.parquet'"
    assert duckdb.sql(query).fetchall() == [(len(frame), arrays["topk_count"].sum())]
    # Without the manifest (a job that has not finished) rows are as wide as the longest.
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    (copy / "_manifest.json").unlink()
    partial = results.load_arrays(copy)
    width = partial["topk_ids"].shape[1]
    assert width == arrays["topk_count"].max()
    np.testing.assert_array_equal(partial["topk_ids"], arrays["topk_ids"][:, :width])
