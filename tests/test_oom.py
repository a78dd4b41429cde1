"""OOM backoff with an injected torch.OutOfMemoryError.

Halve and retry, remember the size that fits, and name the row that does not fit even alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
import torch

from jobs import extract
from lib import sample
from lib.extract import models
from tests.conftest import write_rows

MAX_ROWS = 3  # the injected device holds at most this many rows per forward pass
REAL_SCORED_STATES = models.scored_states


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("oom")
    texts = sample.generate_texts(60, seed=41, mean_words=5, sigma=0.4)  # 7 to 51 tokens
    texts[23] = " ".join(sample.generate_texts(12, seed=42, mean_words=8))  # one row of 435 tokens
    return write_rows(root / "corpus.parquet", texts, ids=[f"r{i:02d}" for i in range(len(texts))])


def run(model_dir: str, corpus: str, out: Path) -> pa.Table:
    argv = [
        f"model.path={model_dir}",
        f"input.path={corpus}",
        "input.id_column=doc_id",
        f"output.dir={out}",
        "output.k=5",
        "output.dtype=float32",
        "model.dtype=float32",
        "input.max_length=64",
        "output.shard_rows=25",
        "batching.max_tokens=512",
    ]
    assert extract.main(argv) == 0
    table = ds.dataset(out, format="parquet").to_table()
    return table.sort_by([("id", "ascending"), ("position", "ascending")]).combine_chunks()


def inject(monkeypatch, fits) -> list[tuple[int, int, bool]]:
    """Make `models.scored_states` raise OOM unless `fits(batch)`; returns the attempts."""
    attempts: list[tuple[int, int, bool]] = []  # (padded width, rows, out of memory)

    def scored_states(lm, batch):
        ok = fits(batch)
        attempts.append((batch.input_ids.shape[1], batch.input_ids.shape[0], not ok))
        if not ok:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (injected)"
            )
        return REAL_SCORED_STATES(lm, batch)

    monkeypatch.setattr(models, "scored_states", scored_states)
    return attempts


def failures_without_memory(batches: list[int]) -> int:
    """How many OOMs plain halving would meet if no batch learned from an earlier one."""

    def failures(rows: int) -> int:
        return 0 if rows <= MAX_ROWS else 1 + failures(rows // 2) + failures(rows - rows // 2)

    return sum(failures(rows) for rows in batches)


def test_oom_splits_batches_and_results_are_unchanged(
    model_dirs, corpus, tmp_path, monkeypatch, caplog
):
    normal_attempts = inject(monkeypatch, lambda batch: True)
    expected = run(model_dirs["gpt2"], corpus, tmp_path / "normal")
    assert max(rows for _, rows, _ in normal_attempts) > MAX_ROWS  # batches the device cannot hold

    attempts = inject(monkeypatch, lambda batch: batch.input_ids.shape[0] <= MAX_ROWS)
    with caplog.at_level(logging.WARNING, logger="lib.extract.stages"):
        result = run(model_dirs["gpt2"], corpus, tmp_path / "split")

    failed = [a for a in attempts if a[2]]
    assert failed, "no batch was split"
    assert all(rows <= MAX_ROWS for _, rows, oom in attempts if not oom)
    assert sum("out of memory" in r.getMessage().lower() for r in caplog.records) == len(failed)
    # A width that ran out of memory is never tried again at that size or larger: later batches of
    # the same length start from the reduced size, so there are fewer failures than big batches.
    for i, (width, rows, oom) in enumerate(attempts):
        if oom:
            assert all(r < rows for w, r, _ in attempts[i + 1 :] if w == width)
    assert len(failed) < failures_without_memory([rows for _, rows, _ in normal_attempts])

    # Same rows; smaller batches may round differently in the last bits.
    assert result.select(["id", "position", "token_id", "token_rank", "topk_ids"]).equals(
        expected.select(["id", "position", "token_id", "token_rank", "topk_ids"])
    )
    for name in ("logsumexp", "token_logprob"):
        difference = pc.max(pc.abs(pc.subtract(result[name], expected[name]))).as_py()
        assert difference < 1e-4, name
    logits = pc.subtract(
        pc.list_flatten(result["topk_logits"]), pc.list_flatten(expected["topk_logits"])
    )
    assert pc.max(pc.abs(logits)).as_py() < 1e-4


def test_a_row_that_does_not_fit_alone_is_named(model_dirs, corpus, tmp_path, monkeypatch, capsys):
    # Memory grows with length: the long row (id r23) does not fit even alone; the others do.
    attempts = inject(monkeypatch, lambda batch: batch.input_ids.shape[1] <= 128)
    out = tmp_path / "out"
    argv = [
        f"model.path={model_dirs['gpt2']}",
        f"input.path={corpus}",
        "input.id_column=doc_id",
        f"output.dir={out}",
        "input.max_length=512",
        "output.shard_rows=25",
        "batching.max_tokens=2048",
    ]
    assert extract.main(argv) == 2
    errors = [
        line for line in capsys.readouterr().err.splitlines() if "error" in line
    ]  # not the progress bar
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert "'r23'" in errors[0] and "does not fit in device memory" in errors[0]
    assert attempts[-1][1:] == (1, True)  # it was tried alone before giving up
    assert not (out / "_SUCCESS").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for shard in out.glob("part-*"):
        pa.parquet.read_table(shard)
