"""Rows that cannot be scored are recorded in `_skipped/skipped.parquet` and the job goes on; every input
id ends up scored or skipped, never both, never neither, and the manifest's totals add up."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from jobs import extract
from lib import sample
from tests.conftest import AWKWARD, write_rows

MAX_LENGTH = 64
LONG = AWKWARD[-1]


def build_rows() -> list[tuple[str, str | None, str | None]]:
    """(id, text, target): generated rows, the awkward ones, null texts (a unit's worth) and
    null or empty targets."""
    texts = sample.generate_texts(14, seed=21, mean_words=6) + AWKWARD + [None] * 9
    targets = sample.generate_texts(len(texts), seed=22, mean_words=4)
    # Short targets for the awkward rows: a row skipped for its text must not also be a long one.
    targets[14 : 14 + len(AWKWARD)] = ["fine"] * len(AWKWARD)
    targets[2] = None  # null target, text present
    targets[5] = ""  # empty target
    targets[-1] = None  # null text and null target: the text is what is missing
    return [
        (f"row-{i:03d}", text, target)
        for i, (text, target) in enumerate(zip(texts, targets, strict=True))
    ]


ROWS = build_rows()
IDS = {i for i, _, _ in ROWS}
NULL_TEXT = {i for i, text, _ in ROWS if text is None}
NULL_TARGET = {i for i, text, target in ROWS if text is not None and target is None}
EMPTY_TEXT = {i for i, text, _ in ROWS if text == ""}
EMPTY_TARGET = {i for i, text, target in ROWS if text is not None and target == ""}
AWKWARD_IDS = {i for i, text, _ in ROWS if text in AWKWARD}


@pytest.fixture(scope="module")
def dirty_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dirty")
    for name, part in (("a.parquet", ROWS[:12]), ("b.parquet", ROWS[12:])):
        ids, texts, targets = zip(*part, strict=True)
        write_rows(root / name, list(texts), list(targets), list(ids))
    return root


def run(
    out: Path, model_dir: str, corpus: Path, *overrides: str
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    argv = [
        f"model.path={model_dir}",
        f"input.path={corpus}",
        f"output.dir={out}",
        "output.k=3",
        f"input.max_length={MAX_LENGTH}",
        "output.shard_rows=4",
        "batching.max_tokens=256",
        *overrides,
    ]
    assert extract.main(argv) == 0
    scored = pd.read_parquet(out, columns=["id", "position"])
    skipped = pq.read_table(out / "_skipped/skipped.parquet").to_pandas()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (out / "_SUCCESS").exists()
    return scored, skipped, manifest


def long_rows(model_dir: str, skipped: dict, targets: str | None = None) -> int:
    """Rows whose text or target (`targets` = "seq2seq" or "continuation") exceeds MAX_LENGTH."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    over = lambda ids: len(ids) > MAX_LENGTH  # noqa: E731
    count = 0
    for row_id, text, target in ROWS:
        if row_id in skipped or text is None:
            continue
        long = over(tok(text)["input_ids"])
        if targets == "seq2seq":
            long = long or over(tok(text_target=target)["input_ids"])
        elif targets == "continuation":
            long = long or over(tok(target, add_special_tokens=False)["input_ids"])
        count += long
    assert count >= 1  # at least the long awkward text
    return count


def check_accounting(
    scored: pd.DataFrame,
    skipped: pd.DataFrame,
    manifest: dict,
    all_ids: set,
    reasons: dict,
    truncated: int,
) -> None:
    scored_ids = set(scored["id"])
    assert skipped["id"].is_unique
    assert scored_ids.isdisjoint(skipped["id"])  # never both
    assert scored_ids | set(skipped["id"]) == all_ids  # never neither
    assert dict(zip(skipped["id"], skipped["reason"], strict=True)) == reasons
    totals = manifest["totals"]
    assert totals == {
        "input_rows": len(all_ids),
        "scored_rows": len(scored_ids),
        "skipped_rows": len(reasons),
        "truncated_rows": truncated,
        "output_rows": len(scored),
        "topk_entries": len(scored) * 3,  # output.k
    }
    assert totals["input_rows"] == totals["scored_rows"] + totals["skipped_rows"]
    assert not scored.duplicated(["id", "position"]).any()


def test_causal_skips_null_and_tokenless_rows(tmp_path, model_dirs, dirty_corpus):
    scored, skipped, manifest = run(
        tmp_path / "out", model_dirs["gpt2"], dirty_corpus, "input.id_column=doc_id"
    )
    # GPT-2 has no BOS: an empty string has no token, so no position to score.
    reasons = {i: "null_text" for i in NULL_TEXT} | {i: "empty_text" for i in EMPTY_TEXT}
    check_accounting(
        scored, skipped, manifest, IDS, reasons, long_rows(model_dirs["gpt2"], reasons)
    )
    # Whitespace, non-Latin, emoji, one letter and the long text are all scored.
    assert AWKWARD_IDS - EMPTY_TEXT <= set(scored["id"])
    long_id = next(i for i, text, _ in ROWS if text == LONG)
    assert scored.loc[scored["id"] == long_id, "position"].max() == MAX_LENGTH - 1


def test_continuation_skips_null_and_empty_targets(tmp_path, model_dirs, dirty_corpus):
    scored, skipped, manifest = run(
        tmp_path / "out",
        model_dirs["gpt2"],
        dirty_corpus,
        "input.id_column=doc_id",
        "input.target_column=target",
    )
    reasons = (
        {i: "null_text" for i in NULL_TEXT}
        | {i: "null_target" for i in NULL_TARGET}
        | {i: "empty_text" for i in EMPTY_TEXT}
        | {i: "empty_target" for i in EMPTY_TARGET}
    )
    assert len(set(reasons.values())) == 4
    truncated = long_rows(model_dirs["gpt2"], reasons, targets="continuation")
    check_accounting(scored, skipped, manifest, IDS, reasons, truncated)


def test_seq2seq_targets_score_empty_strings(tmp_path, model_dirs, dirty_corpus):
    """T5 turns "" into a lone EOS, so empty texts and targets are scored, not skipped."""
    scored, skipped, manifest = run(
        tmp_path / "out",
        model_dirs["t5"],
        dirty_corpus,
        "input.id_column=doc_id",
        "input.target_column=target",
        "decoder.mode=targets",
    )
    reasons = {i: "null_text" for i in NULL_TEXT} | {i: "null_target" for i in NULL_TARGET}
    truncated = long_rows(model_dirs["t5"], reasons, targets="seq2seq")
    check_accounting(scored, skipped, manifest, IDS, reasons, truncated)
    assert EMPTY_TEXT | EMPTY_TARGET <= set(scored["id"])


def test_row_index_ids_across_files(tmp_path, model_dirs, dirty_corpus):
    """Without an id column the ids are global row numbers, and the same accounting holds."""
    scored, skipped, manifest = run(tmp_path / "out", model_dirs["llama"], dirty_corpus)
    # Llama prepends BOS, so "" still has a position to score.
    reasons = {row: "null_text" for row, (_, text, _) in enumerate(ROWS) if text is None}
    truncated = long_rows(model_dirs["llama"], {})
    check_accounting(scored, skipped, manifest, set(range(len(ROWS))), reasons, truncated)
    assert len(manifest["shards"]) == 3 + 5  # 12 rows and 18 rows in units of 4


def test_a_row_truncated_twice_counts_once(tmp_path, model_dirs):
    path = write_rows(tmp_path / "c.parquet", [LONG, "short"], [LONG, "short"], ["both", "neither"])
    _, _, manifest = run(
        tmp_path / "out",
        model_dirs["t5"],
        Path(path),
        "input.id_column=doc_id",
        "input.target_column=target",
        "decoder.mode=targets",
    )
    assert manifest["totals"]["truncated_rows"] == 1


def test_a_skipped_row_is_not_counted_as_truncated(tmp_path, model_dirs):
    """GPT-2 gives "" no token, so the row is skipped; its long target was never scored."""
    path = write_rows(tmp_path / "c.parquet", ["", "short"], [LONG, "short"], ["empty", "fine"])
    _, skipped, manifest = run(
        tmp_path / "out",
        model_dirs["gpt2"],
        Path(path),
        "input.id_column=doc_id",
        "input.target_column=target",
    )
    assert skipped["id"].tolist() == ["empty"]
    assert manifest["totals"]["truncated_rows"] == 0
