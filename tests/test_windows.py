"""input.long_documents=windows: every token of a long text scored once, in rolling windows, as
lm-evaluation-harness's loglikelihood_rolling scores it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from jobs import extract
from lib import results, sample
from lib.extract import batching
from lib.inspect.verify import verify
from tests.conftest import write_rows
from tests.reference import load

MAX_LENGTH = 16


def harness_windows(tokens: list[int], prefix_token: int, max_seq_len: int, context_len: int):
    """lm-evaluation-harness 0.4's rule, restated from its documentation and source:
    get_rolling_token_windows followed by make_disjoint_window; (context, continuation) pairs."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(tokens))
    pairs = [([prefix_token] + tokens[: first_seq_len - 1], tokens[:first_seq_len])]
    predicted += first_seq_len
    while predicted < len(tokens):
        window_pred_len = min(len(tokens) - predicted, pred_len)
        window_end = predicted + window_pred_len
        pairs.append(
            (
                tokens[window_end - max_seq_len - 1 : window_end - 1],
                tokens[window_end - window_pred_len : window_end],
            )
        )
        predicted += window_pred_len
    return [(context[: len(context) - (len(cont) - 1)], cont) for context, cont in pairs]


@pytest.mark.parametrize(
    "n,context", [(1, 1), (16, 1), (17, 1), (40, 1), (40, 8), (100, 5), (33, 16)]
)
def test_windows_score_every_token_once_as_the_harness_does(n, context):
    tokens = list(range(100, 100 + n))
    windows = batching.window_requests(7, tokens, 1, MAX_LENGTH, context)
    predicted = [t for w in windows for t in w.labels]
    assert predicted == tokens  # every token once, in order
    positions = [w.offset + w.first + i for w in windows for i in range(len(w.labels))]
    assert positions == list(range(n))  # absolute: position p predicts tokens[p]
    sequence = [1, *tokens]
    for window in windows:
        assert len(window.ids) <= MAX_LENGTH
        assert window.ids == sequence[window.offset : window.offset + len(window.ids)]
        # the last position of the window predicts its last label
        assert window.first + len(window.labels) == len(window.ids)
    for window in windows[1:-1]:
        assert window.first == context - 1  # `context` tokens up to the first new prediction
    if len(windows) > 1:  # the last window fills up with as much context as fits
        assert windows[-1].first >= context - 1
    # Model inputs and scored tokens equal the harness's (context + continuation)[:-1] pairs.
    pairs = harness_windows(tokens, 1, MAX_LENGTH, context)
    assert len(pairs) == len(windows)
    for (ctx, cont), window in zip(pairs, windows, strict=True):
        assert (ctx + cont)[:-1] == window.ids
        assert cont == window.labels


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory) -> str:
    texts = sample.generate_texts(12, seed=5, mean_words=30, sigma=0.6)
    texts[4] = None
    texts[6] = "x"
    path = tmp_path_factory.mktemp("long") / "long.parquet"
    return write_rows(path, texts, ids=[f"long-{i}" for i in range(len(texts))])


def _run(tmp_path, model_dir: str, corpus: str, *overrides: str):
    out = tmp_path / "out"
    argv = [
        f"model.path={model_dir}",
        f"input.path={corpus}",
        "input.id_column=doc_id",
        f"output.dir={out}",
        f"input.max_length={MAX_LENGTH}",
        "input.long_documents=windows",
        "output.level=both",
        "output.k=3",
        "model.dtype=float32",
        "batching.max_tokens=40",  # windows of one text land in different batches
        "output.shard_rows=5",
        *overrides,
    ]
    assert extract.main(argv) == 0
    return out


@torch.inference_mode()
def _reference(model_dir: str, corpus: str, context: int) -> dict:
    """{id: [log p of each token]} from an unbatched forward of each harness window."""
    model, tok = load(model_dir)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    frame = pd.read_parquet(corpus)
    out = {}
    for row_id, text in zip(frame["doc_id"], frame["text"], strict=True):
        if pd.isna(text):
            continue
        tokens = tok(text, add_special_tokens=False)["input_ids"]
        logprobs = []
        for ctx, cont in harness_windows(tokens, start, MAX_LENGTH, context):
            ids = (ctx + cont)[:-1]
            logits = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            scored = logits[len(ids) - len(cont) :]
            logprobs += scored[torch.arange(len(cont)), torch.tensor(cont)].tolist()
        out[row_id] = logprobs
    return out


@pytest.mark.parametrize("context", [1, None], ids=["context-1", "default-context"])
def test_windows_equal_the_unbatched_rolling_loglikelihood(
    tmp_path, model_dirs, long_corpus, context
):
    overrides = [] if context is None else [f"input.window_context={context}"]
    out = _run(tmp_path, model_dirs["gpt2"], long_corpus, *overrides)
    assert verify(out, check_input=True).problems == []
    want = _reference(model_dirs["gpt2"], long_corpus, context or MAX_LENGTH // 2)
    assert max(len(v) for v in want.values()) > 3 * MAX_LENGTH  # several windows a text
    rows = results.load_frame(out).sort_values(["id", "position"])
    docs = results.load_documents(out).set_index("id")
    assert set(docs.index) == set(want)
    for row_id, logprobs in want.items():
        mine = rows[rows.id == row_id]
        assert mine.position.tolist() == list(range(len(logprobs)))  # each token once
        np.testing.assert_allclose(mine.token_logprob, logprobs, atol=1e-3, err_msg=row_id)
        assert docs.loc[row_id, "sum_logprob"] == pytest.approx(sum(logprobs), abs=1e-3)
        assert docs.loc[row_id, "n_tokens"] == len(logprobs)
        assert not docs.loc[row_id, "truncated"]
    assert docs.bits_per_byte.notna().all()  # nothing was cut


@pytest.mark.parametrize(
    "model,overrides,why",
    [
        ("t5", ["decoder.mode=targets", "input.target_column=target"], "seq2seq models"),
        ("gpt2", ["input.target_column=target"], "input.target_column"),
        ("gpt2", ["output.rows=examples"], "output.rows=examples"),
    ],
    ids=["seq2seq", "continuation", "examples"],
)
def test_windows_are_refused_where_they_do_not_apply(
    tmp_path, model_dirs, corpus, capsys, model, overrides, why
):
    argv = [
        f"model.path={model_dirs[model]}",
        f"input.path={corpus}",
        f"output.dir={tmp_path / 'out'}",
        "input.long_documents=windows",
        *overrides,
    ]
    assert extract.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: config key input.long_documents: windows scores whole texts")
    assert why in line and "\n" not in line
