"""lib.output.manifest: totals, shard list and skipped rows from the unit records; _SUCCESS last."""

from __future__ import annotations

import hashlib
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib import faults
from lib.config import load_config
from lib.errors import UserError
from lib.extract.corpus import WorkUnit
from lib.output import layout, manifest
from lib.output.records import Manifest, ShardEntry, UnitRecord, UnitSpan

UNITS = [WorkUnit(0, "a.parquet", 0, 4, 0), WorkUnit(1, "a.parquet", 4, 6, 4)]


def _scores(tokens: int, logprob: float, correct: int) -> dict:
    """A unit's partial scores: every token with `logprob`, all in the top calibration bin."""
    return {
        "tokens": tokens,
        "sum_logprob": tokens * logprob,
        "sum_entropy": tokens * 2.0,
        "top1_correct": correct,
        "whole_sum_logprob": tokens * logprob,
        "whole_bytes": 4 * tokens,
        "calibration_counts": [0] * 14 + [tokens],
        "calibration_confidence": [0.0] * 14 + [0.95 * tokens],
        "calibration_correct": [0] * 14 + [correct],
    }


SHARD = b"x" * 10  # every shard's bytes
SHARD_SHA256 = hashlib.sha256(SHARD).hexdigest()


def _record(unit: WorkUnit, run_id: str, skipped: list, tokens: int) -> UnitRecord:
    entry = ShardEntry(layout.shard_name(unit.name, "parquet"), tokens, len(SHARD), SHARD_SHA256)
    return UnitRecord(
        fingerprint="fp",
        rank=unit.index % 2,
        run_id=run_id,
        unit=UnitSpan(unit.index, unit.file, unit.start, unit.stop),
        input_rows=unit.rows,
        scored_rows=unit.rows - len(skipped),
        skipped_rows=len(skipped),
        truncated_rows=1,
        tokens=tokens,
        padded_tokens=tokens + 2,
        started_at=0.0,
        committed_at=1.0,
        lengths={},
        batches=[],
        scores=_scores(tokens, -1.0, tokens // 2),
        skipped=skipped,
        files=[entry],
    )


@pytest.fixture
def out_dir(tmp_path):
    for folder in (layout.TOKENS, layout.UNITS):
        (tmp_path / folder).mkdir()
    records = [_record(UNITS[0], "old", [["d1", "null_text"]], 9), _record(UNITS[1], "now", [], 5)]
    for unit, record in zip(UNITS, records, strict=True):
        layout.shard_path(tmp_path, unit.name, "parquet").write_bytes(SHARD)
        layout.record_path(tmp_path, unit.name).write_text(json.dumps(record.to_json()))
    return tmp_path


def _config(out_dir):
    return load_config(None, ["model.path=m", "input.path=i", f"output.dir={out_dir}"])


def _finalize(out_dir) -> manifest.Manifest:
    facts = manifest.RunFacts(
        schema=pa.schema([pa.field("id", pa.string())]),
        documents_schema=None,
        id_type=pa.string(),
        identity={"path": "m"},
        fingerprint="fp",
        run_id="now",
        recomputed=["tokens/part-00001.parquet"],
        wall=2.0,
        world_size=2,
    )
    return manifest.finalize(out_dir, UNITS, _config(out_dir), facts)


def test_totals_shards_and_this_runs_throughput(out_dir):
    result = _finalize(out_dir)
    assert result.to_json()["totals"] == {
        "input_rows": 6,
        "scored_rows": 5,
        "skipped_rows": 1,
        "truncated_rows": 2,
        "output_rows": 14,
    }
    shards = result.to_json()["shards"]
    assert [s["file"] for s in shards] == ["tokens/part-00000.parquet", "tokens/part-00001.parquet"]
    assert set(shards[0]) == {"file", "rows", "bytes", "sha256", "rank"}
    assert [s["rank"] for s in shards] == [0, 1]
    # Only the units this run computed count towards its throughput.
    run = result.throughput
    assert (run["units"], run["rows"], run["tokens"], run["padded_tokens"]) == (1, 2, 5, 7)
    assert run["tokens_per_s"] == 2.5
    assert result.recomputed == ["tokens/part-00001.parquet"]
    assert Manifest.from_json(result.to_json()) == result
    skipped = pq.read_table(out_dir / layout.SKIPPED)
    assert skipped.to_pylist() == [{"id": "d1", "reason": "null_text"}]


def test_a_missing_record_is_one_line_saying_what_to_do(out_dir):
    layout.record_path(out_dir, "part-00001").unlink()
    with pytest.raises(UserError, match="part-00001 or its record is missing.*run the same"):
        _finalize(out_dir)


@pytest.mark.parametrize("damage", [b"y" * 10, b"x" * 9])
def test_a_shard_changed_after_its_commit_keeps_the_manifest_away(out_dir, damage):
    """Bytes that are not those recorded (same size, or cut): one line naming the shard and
    what to do, and no manifest."""
    layout.shard_path(out_dir, "part-00001", "parquet").write_bytes(damage)
    with pytest.raises(UserError, match=r"shard tokens/part-00001.parquet changed after it was "):
        _finalize(out_dir)
    assert not (out_dir / layout.MANIFEST).exists()


def test_scores_merge_every_units_partial_sums(out_dir):
    """Units of 9 and 5 tokens (log p = -1 each, 4 and 2 correct), 4 bytes a token: the corpus
    figures are over all 14, whichever run or rank computed them."""
    scores = _finalize(out_dir).scores
    assert scores["tokens"] == 14
    assert scores["mean_logprob"] == pytest.approx(-1.0)
    assert scores["perplexity"] == pytest.approx(math.e)
    assert scores["bits_per_byte"] == pytest.approx(14 / (math.log(2) * 56))
    assert scores["mean_entropy"] == pytest.approx(2.0)
    assert scores["top1_accuracy"] == pytest.approx(6 / 14)
    # One filled bin: confidence 0.95, accuracy 6/14.
    assert scores["ece"] == pytest.approx(abs(0.95 - 6 / 14))
    calibration = scores["calibration"]
    assert calibration["counts"] == [0] * 14 + [14]
    assert calibration["confidence"][-1] == pytest.approx(0.95)
    assert calibration["accuracy"][-1] == pytest.approx(6 / 14)
    assert calibration["confidence"][0] is None and calibration["accuracy"][0] is None


def test_success_is_written_after_the_manifest(out_dir, monkeypatch):
    written = _finalize(out_dir)
    faults.reset()  # count from this test on
    monkeypatch.setenv("LOGIT_EXTRACT_FAIL_AT", "before_success=EIO")
    with pytest.raises(OSError):
        manifest.write(out_dir, written)
    assert layout.read_manifest(out_dir) == written
    assert not (out_dir / layout.SUCCESS).exists()
    monkeypatch.delenv("LOGIT_EXTRACT_FAIL_AT")
    manifest.write(out_dir, written)
    assert (out_dir / layout.SUCCESS).exists()
