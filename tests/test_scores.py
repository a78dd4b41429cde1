"""Document rows and corpus scores: lib.extract.scores on hand-made positions, and whole jobs against an
unbatched float64 reference (every document column, the manifest's scores)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from jobs import extract
from jobs import verify as verify_job
from lib import results
from lib.extract import scores
from lib.inspect.verify import verify
from lib.output import rows
from tests.reference import read_corpus, reference_rows, stats64


# -- lib.extract.scores on hand-made positions ---------------------------------------------------------
def _positions(rows, logprobs, ranks, entropy=None, std=None) -> dict[str, np.ndarray]:
    n = len(rows)
    logprobs = np.array(logprobs, dtype=np.float32)
    return {
        "row": np.array(rows, dtype=np.int32),
        "position": np.arange(n, dtype=np.int32),
        "has_token": ~np.isnan(logprobs),
        "token_logprob": np.nan_to_num(logprobs),
        "token_rank": np.array(ranks, dtype=np.int32),
        "entropy": np.array(entropy if entropy is not None else [1.0] * n, np.float32),
        "top1_logprob": np.full(n, -0.1, np.float32),
        "logprob_std": np.array(std if std is not None else [2.0] * n, np.float32),
    }


def test_document_columns_by_hand():
    # Row 0: logprobs -1, -3, -2, -6, -4 (one correct); row 2: no token at all; row 3: -0.5;
    # row 4: an empty target whose EOS scores -1.5 in no bytes.
    arrays = _positions(
        [0, 0, 0, 0, 0, 0, 2, 3, 3, 4],
        [-1, -3, -2, -6, -4, np.nan, np.nan, -0.5, np.nan, -1.5],
        [0, 4, 1, 9, 2, 0, 0, 3, 0, 0],
        entropy=[1, 2, 3, 4, 5, 9, 9, 0.5, 9, 1],
    )
    truncated = np.array([False, False, False, True, False])
    n_bytes = np.array([10, 0, 7, 4, 0])
    columns = scores.document_columns(arrays, np.array([0, 2, 3, 4]), n_bytes, truncated, 0.4)
    np.testing.assert_array_equal(columns["n_tokens"], [5, 0, 1, 1])
    np.testing.assert_allclose(columns["sum_logprob"], [-16, 0, -0.5, -1.5])
    np.testing.assert_allclose(columns["mean_logprob"], [-3.2, np.nan, -0.5, -1.5])
    np.testing.assert_allclose(
        columns["perplexity"], [math.exp(3.2), np.nan, math.exp(0.5), math.exp(1.5)]
    )
    np.testing.assert_allclose(columns["mean_entropy"], [3, np.nan, 0.5, 1])
    np.testing.assert_allclose(columns["top1_accuracy"], [0.2, np.nan, 0, 1])
    # bits per byte: null for row 2 (no token), the truncated row 3 and row 4 (no bytes: not inf)
    np.testing.assert_allclose(
        columns["bits_per_byte"], [16 / (math.log(2) * 10), np.nan, np.nan, np.nan]
    )
    # Min-K% at 0.4: the lowest 2 of 5 (-6, -4); at least one token for rows 3 and 4.
    np.testing.assert_allclose(columns["min_k_logprob"], [-5, np.nan, -0.5, -1.5])
    # z = (log p + entropy) / std: row 0 gives 0, -0.5, 0.5, -1, 0.5; lowest two: -1, -0.5.
    np.testing.assert_allclose(columns["min_k_plus_plus"], [-0.75, np.nan, 0, -0.25])
    table = rows.documents_table(
        rows.documents_schema(pa.string()),
        pa.array(["a", "b", "c", "d", "e"]),
        np.array([0, 2, 3, 4]),
        columns,
    )
    assert table.column("id").to_pylist() == ["a", "c", "d", "e"]
    assert table.column("mean_logprob").to_pylist()[1] is None  # NaN is stored as null
    assert table.column("truncated").to_pylist() == [False, False, True, False]
    assert table.column("bits_per_byte").null_count == 3
    # The corpus figure takes the same documents as the column: not row 2's 7 bytes (no token
    # scored), nor the truncated row 3, nor row 4's log-probability without bytes.
    partial = scores.partial(arrays, columns)
    assert partial["whole_bytes"] == 10 and partial["whole_sum_logprob"] == -16
    merged = scores.merge([partial])
    assert merged["bits_per_byte"] == pytest.approx(16 / (math.log(2) * 10), rel=1e-12)


def test_a_flat_distribution_has_z_zero_and_generate_has_no_bytes():
    arrays = _positions([0, 0], [-2.0, -2.0], [0, 0], entropy=[2.0, 2.0], std=[0.0, 0.0])
    columns = scores.document_columns(arrays, np.array([0]), None, np.array([False]), 0.2)
    assert columns["min_k_plus_plus"][0] == 0
    assert "n_bytes" not in columns and "bits_per_byte" not in columns
    table = rows.documents_table(
        rows.documents_schema(pa.int64()), pa.array([7]), np.array([0]), columns
    )
    assert table.column("n_bytes").null_count == 1 and table.column("bits_per_byte").null_count == 1
    assert scores.partial(arrays, columns)["whole_bytes"] is None
    assert scores.merge([scores.partial(arrays, columns)])["bits_per_byte"] is None


def test_merge_of_units_equals_one_unit():
    """Partial sums add up: two halves of a unit merge to the figures of the whole."""
    rng = np.random.default_rng(0)
    n = 200
    arrays = _positions(
        np.sort(rng.integers(0, 20, n)), -rng.exponential(2, n), rng.integers(0, 3, n)
    )
    arrays["top1_logprob"] = np.log(rng.uniform(0.01, 1, n)).astype(np.float32)
    n_bytes, truncated = rng.integers(5, 50, 20), rng.uniform(size=20) < 0.2
    rows = np.unique(arrays["row"])

    def partial(mask):
        part = {name: values[mask] for name, values in arrays.items()}
        mine = rows[np.isin(rows, part["row"])]
        return scores.partial(part, scores.document_columns(part, mine, n_bytes, truncated, 0.2))

    whole = scores.merge([partial(np.ones(n, bool))])
    split = scores.merge([partial(arrays["row"] < 10), partial(arrays["row"] >= 10)])
    assert split.keys() == whole.keys()
    for key in ("tokens", "top1_accuracy"):
        assert split[key] == whole[key]
    for key in ("mean_logprob", "perplexity", "bits_per_byte", "mean_entropy", "ece"):
        assert split[key] == pytest.approx(whole[key], rel=1e-12)
    assert split["calibration"]["counts"] == whole["calibration"]["counts"]
    assert sum(whole["calibration"]["counts"]) == n


# -- whole jobs against the unbatched float64 reference ----------------------------------------
CASES = [
    ("gpt2", "causal", []),
    ("gpt2", "continuation", ["input.target_column=target"]),
    ("t5", "targets", ["decoder.mode=targets", "input.target_column=target"]),
]
PREFIX, MAX_LENGTH, FRACTION = "say: ", 24, 0.3


def _run(tmp_path, model_dir: str, corpus: str, overrides: list[str], name: str = "out"):
    out = tmp_path / name
    argv = [
        f"model.path={model_dir}",
        f"input.path={corpus}",
        "input.id_column=doc_id",
        f"output.dir={out}",
        "output.k=5",
        "model.dtype=float32",
        "batching.max_tokens=96",
        f"input.max_length={MAX_LENGTH}",
        f"input.prefix={PREFIX}",
        "output.shard_rows=17",
        f"output.min_k_fraction={FRACTION}",
        *overrides,
    ]
    assert extract.main(argv) == 0
    return out


def _lowest_mean(values: list[float]) -> float:
    take = max(1, math.floor(FRACTION * len(values)))
    return float(np.mean(sorted(values)[:take]))


def _truncated(tok, mode: str, text: str, target) -> bool:
    ids = tok(PREFIX + text)["input_ids"]
    if mode == "targets":
        return len(ids) > MAX_LENGTH or len(tok(text_target=target)["input_ids"]) > MAX_LENGTH
    if mode == "continuation":
        target_ids = tok(target, add_special_tokens=False)["input_ids"]
        return len(ids) > MAX_LENGTH or len(target_ids) > MAX_LENGTH
    return len(ids) > MAX_LENGTH


def _reference(model_dir: str, corpus: str, mode: str) -> tuple[pd.DataFrame, dict]:
    """Document rows and corpus scores computed the obvious way, in float64, one row at a time."""
    frame = read_corpus(corpus).set_index("doc_id")
    rows = reference_rows(model_dir, frame.reset_index(), mode, PREFIX, MAX_LENGTH)
    tok = AutoTokenizer.from_pretrained(model_dir)
    positions: dict = {}
    for (row_id, _), (token, logits) in sorted(rows.items()):
        positions.setdefault(row_id, [])
        if token is not None:
            s = stats64(logits)
            z = (s["logp"][token] - s["mu"]) / s["sigma"]
            correct = not (logits > logits[token]).any()
            positions[row_id].append(
                (s["logp"][token], s["entropy"], z, correct, s["top1_logprob"])
            )
    docs, conf, hits = [], [], []
    for row_id, items in positions.items():
        text, target = frame.loc[row_id, "text"], frame.loc[row_id, "target"]
        scored = PREFIX + text if mode == "causal" else target
        logp = [i[0] for i in items]
        cut = _truncated(tok, mode, text, target)
        n_bytes = len(scored.encode())
        docs.append(
            {
                "id": row_id,
                "n_tokens": len(items),
                "truncated": cut,
                "n_bytes": n_bytes,
                "sum_logprob": sum(logp),
                "mean_logprob": np.mean(logp),
                "perplexity": math.exp(-np.mean(logp)),
                "bits_per_byte": (
                    np.nan if cut or not n_bytes else -sum(logp) / (math.log(2) * n_bytes)
                ),
                "mean_entropy": np.mean([i[1] for i in items]),
                "top1_accuracy": np.mean([i[3] for i in items]),
                "min_k_logprob": _lowest_mean(logp),
                "min_k_plus_plus": _lowest_mean([i[2] for i in items]),
            }
        )
        conf += [math.exp(i[4]) for i in items]
        hits += [i[3] for i in items]
    docs = pd.DataFrame(docs).set_index("id").sort_index()
    conf, hits = np.array(conf), np.array(hits)
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(abs(hits[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / len(conf)
    whole = ~docs["truncated"] & (docs["n_bytes"] > 0)
    corpus_scores = {
        "tokens": int(docs["n_tokens"].sum()),
        "mean_logprob": docs["sum_logprob"].sum() / docs["n_tokens"].sum(),
        "bits_per_byte": -docs["sum_logprob"][whole].sum()
        / (math.log(2) * docs["n_bytes"][whole].sum()),
        "mean_entropy": float(
            np.mean(np.concatenate([[i[1] for i in v] for v in positions.values()]))
        ),
        "top1_accuracy": float(hits.mean()),
        "ece": ece,
    }
    return docs, corpus_scores


@pytest.mark.parametrize("model,mode,overrides", CASES, ids=[f"{m}-{mode}" for m, mode, _ in CASES])
def test_documents_and_scores_equal_the_float64_reference(
    tmp_path, model_dirs, corpus, model, mode, overrides
):
    out = _run(tmp_path, model_dirs[model], corpus, ["output.level=both", *overrides])
    assert verify(out).problems == []
    want, want_scores = _reference(model_dirs[model], corpus, mode)
    got = results.load_documents(out).set_index("id").sort_index()
    assert list(got.index) == list(want.index)
    assert got["truncated"].any() and not got["truncated"].all()  # both kinds are tested
    for column in ("n_tokens", "truncated", "n_bytes"):
        assert (got[column].to_numpy() == want[column].to_numpy()).all(), column
    for column in want.columns.drop(["n_tokens", "truncated", "n_bytes"]):
        tolerance = 1e-2 if column == "min_k_plus_plus" else 1e-3
        np.testing.assert_allclose(
            got[column].to_numpy(float),
            want[column].to_numpy(float),
            rtol=tolerance,
            atol=tolerance,
            err_msg=column,
        )
    manifest_scores = json.loads((out / "_manifest.json").read_text())["scores"]
    assert manifest_scores["tokens"] == want_scores["tokens"]
    assert manifest_scores["perplexity"] == pytest.approx(
        math.exp(-want_scores["mean_logprob"]), rel=1e-3
    )
    for key in ("mean_logprob", "bits_per_byte", "mean_entropy", "top1_accuracy", "ece"):
        assert manifest_scores[key] == pytest.approx(want_scores[key], abs=1e-3), key


def test_level_documents_alone_equals_level_both(tmp_path, model_dirs, corpus, capsys):
    """Level documents (no top-k, no token rows) gives the document rows of level both, under
    another token budget too."""
    gpt2 = model_dirs["gpt2"]
    both = _run(tmp_path, gpt2, corpus, ["output.level=both"], "both")
    alone = _run(
        tmp_path, gpt2, corpus, ["output.level=documents", "batching.max_tokens=4096"], "alone"
    )
    assert not (alone / "tokens").exists()
    assert verify(alone, check_input=True).problems == []
    # jobs.verify counts each kind of row apart
    capsys.readouterr()
    for out, wording in (
        (alone, "{d:,} document rows"),
        (both, "{t:,} token rows and {d:,} document rows"),
    ):
        manifest = json.loads((out / "_manifest.json").read_text())
        totals, shards = manifest["totals"], len(manifest["shards"])
        assert verify_job.main([str(out)]) == 0
        line = wording.format(t=totals["output_rows"], d=totals["document_rows"])
        assert capsys.readouterr().out == f"OK {out}: {shards} shards, {line}\n"
    pd.testing.assert_frame_equal(
        results.load_documents(alone), results.load_documents(both), rtol=1e-5, atol=1e-5
    )
    first, second = (
        json.loads((o / "_manifest.json").read_text())["scores"] for o in (alone, both)
    )
    assert first["tokens"] == second["tokens"]
    assert first["ece"] == pytest.approx(second["ece"], abs=1e-5)
    # the numpy reader gives the same columns, with nulls as NaN (floats) or -1 (n_bytes)
    frame, arrays = results.load_documents(both), results.document_arrays(both)
    assert set(arrays) == set(frame.columns)
    assert list(arrays["id"]) == list(frame["id"])
    for column in frame.columns.drop("id"):
        expected = frame[column].to_numpy()
        if column == "n_bytes":
            expected = frame[column].fillna(-1).to_numpy()
        np.testing.assert_array_equal(arrays[column], expected, err_msg=column)


def test_start_mode_has_no_documents(tmp_path, model_dirs, corpus, capsys):
    argv = [
        f"model.path={model_dirs['t5']}",
        f"input.path={corpus}",
        f"output.dir={tmp_path / 'out'}",
        "output.level=documents",
    ]
    assert extract.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: config key output.level: documents needs scored tokens")
    assert "\n" not in line


def test_generate_mode_documents_have_no_bytes(tmp_path, model_dirs, corpus):
    out = _run(
        tmp_path,
        model_dirs["t5"],
        corpus,
        ["decoder.mode=generate", "decoder.max_new_tokens=3", "output.level=documents"],
    )
    frame, arrays = results.load_documents(out), results.document_arrays(out)
    assert len(frame) > 0 and frame["n_bytes"].isna().all()
    assert (arrays["n_bytes"] == -1).all() and arrays["n_bytes"].dtype == np.int64
    np.testing.assert_array_equal(arrays["n_tokens"], frame["n_tokens"].to_numpy())
