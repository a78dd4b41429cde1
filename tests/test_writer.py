"""Output rows and ShardWriter's atomic, checksummed commit."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from lib import faults
from lib.errors import OutputError, UserError
from lib.output import layout, writer
from lib.output import rows as output_rows
from lib.output.records import UnitRecord, UnitSpan

K = 3


def _record(rank: int = 0) -> UnitRecord:
    """A unit record whose counts do not matter here."""
    span = UnitSpan(7, "in.parquet", 0, 7)
    return UnitRecord("f", rank, "r", span, 7, 7, 0, 0, 0, 0, 0.0, 0.0, {}, [], {}, [])


def _schema(full: bool = False) -> pa.Schema:
    return output_rows.output_schema(pa.string(), K, 11, "float16", full=full)


def _table(schema: pa.Schema, ids: list[str], rows: int = 4) -> pa.Table:
    """Rows with a null token at the last position, as a causal model's last position has."""
    rng = np.random.default_rng(0)
    row = np.arange(rows) % len(ids)
    stats = {
        "has_token": np.arange(rows) < rows - 1,
        "token_logprob": rng.normal(size=rows).astype(np.float32),
        "token_rank": np.arange(rows, dtype=np.int32),
        "logsumexp": rng.normal(size=rows).astype(np.float32),
        "entropy": rng.uniform(0, 2, size=rows).astype(np.float32),
        "topk_ids": rng.integers(0, 11, size=(rows, K)).astype(np.int32),
        "topk_logits": rng.normal(size=(rows, K)).astype(np.float16),
    }
    return output_rows.to_table(
        schema,
        pa.array(ids),
        row,
        np.arange(rows, dtype=np.int32),
        np.arange(rows, dtype=np.int64) + 5,
        stats,
    )


@pytest.fixture
def out_dir(tmp_path):
    (tmp_path / layout.UNITS).mkdir()
    return tmp_path


def _visible(path) -> list[str]:
    """What a reader of OUT sees: files outside `_` and `.` names, relative to OUT."""
    return sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )


def _owned(path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def _ok() -> None:
    """A lease check that passes."""


def test_to_table_builds_the_schema_with_nulls_where_no_token(out_dir):
    schema = _schema()
    table = _table(schema, ["a", "b"])
    assert table.schema == schema
    assert table.column("id").to_pylist() == ["a", "b", "a", "b"]
    assert table.column("token_id").to_pylist() == [5, 6, 7, None]
    assert table.column("token_rank").null_count == 1
    assert table.column("topk_ids").type == pa.list_(pa.int32(), K)


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_commit_makes_the_shard_visible_only_after_close(out_dir, fmt):
    schema = _schema()
    shard = writer.ShardWriter(out_dir, "part-00007", schema, fmt)
    first, second = _table(schema, ["a", "b"]), _table(schema, ["c"], rows=3)
    shard.write(first)
    shard.write(second)
    shard.write(first.slice(0, 0))  # empty tables are skipped
    assert _visible(out_dir) == []
    assert shard.tmp.parent == out_dir / layout.TMP and shard.tmp.exists()
    assert shard.tmp.name == f"part-00007.{fmt}@{layout.writer_tag()}.tmp"
    assert not (out_dir / layout.UNITS / "part-00007.json").exists()

    returned = writer.commit([shard], _record(rank=3), _ok)
    assert _visible(out_dir) == [f"tokens/part-00007.{fmt}"]
    assert not shard.tmp.exists()
    record = json.loads((out_dir / layout.UNITS / "part-00007.json").read_text())
    data = (out_dir / "tokens" / f"part-00007.{fmt}").read_bytes()
    assert record == returned.to_json()
    assert record["files"] == [
        {
            "file": f"tokens/part-00007.{fmt}",
            "rows": 7,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    ]
    assert record["rank"] == 3 and UnitRecord.from_json(record) == returned
    expected = pa.concat_tables([first, second])
    if fmt == "parquet":
        read = pq.read_table(out_dir)  # a plain read of OUT: only the shard
    else:
        read = ds.dataset(out_dir, format="arrow").to_table()  # skips _units and _tmp
    assert read.schema.names == schema.names
    assert read.cast(schema).equals(expected)


def test_full_logits_round_trip(out_dir):
    schema = _schema(full=True)
    rows = 3
    stats = {
        "has_token": np.ones(rows, bool),
        "token_logprob": np.zeros(rows, np.float32),
        "token_rank": np.zeros(rows, np.int32),
        "logsumexp": np.ones(rows, np.float32),
        "entropy": np.ones(rows, np.float32),
        "logits": np.arange(rows * 11, dtype=np.float16).reshape(rows, 11),
    }
    table = output_rows.to_table(
        schema,
        pa.array(["x"]),
        np.zeros(rows, np.int64),
        np.arange(rows, dtype=np.int32),
        np.arange(rows),
        stats,
    )
    shard = writer.ShardWriter(out_dir, "part-00000", schema, "arrow")
    shard.write(table)
    writer.commit([shard], _record(), _ok)
    read = ds.dataset(out_dir, format="arrow").to_table()
    assert read.column("logits").to_pylist()[2] == list(range(22, 33))


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_abort_leaves_nothing(out_dir, fmt):
    schema = _schema()
    shard = writer.ShardWriter(out_dir, "part-00001", schema, fmt)
    shard.write(_table(schema, ["a"]))
    shard.abort()
    assert _owned(out_dir) == []


@pytest.mark.parametrize("where", ["write", "shard_close", "fsync", "rename"])
def test_a_failed_write_or_commit_names_the_file_and_leaves_nothing(out_dir, monkeypatch, where):
    """A full disk at any step: an OutputError naming the temporary, and no file left."""
    faults.reset()  # count from this test on
    monkeypatch.setenv("LOGIT_EXTRACT_FAIL_AT", where)
    schema = _schema()
    shard = writer.ShardWriter(out_dir, "part-00002", schema, "parquet")
    with pytest.raises(OutputError, match=r"cannot write .*: No space left on device"):
        shard.write(_table(schema, ["a"]))
        writer.commit([shard], _record(), _ok)
    assert _owned(out_dir) == []


def test_a_lost_lease_stops_the_commit(out_dir):
    schema = _schema()
    shard = writer.ShardWriter(out_dir, "part-00003", schema, "parquet")
    shard.write(_table(schema, ["a"]))

    def lost() -> None:
        raise UserError("lost its lease")

    with pytest.raises(UserError, match="lost its lease"):
        writer.commit([shard], _record(), lost)
    assert _owned(out_dir) == []


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "_manifest.json"
    layout.write_atomic(target, b"one", tmp_path)
    layout.write_atomic(target, b"two", tmp_path)
    assert target.read_bytes() == b"two"
    assert _owned(tmp_path) == ["_manifest.json"]


def _topk_stats(rows: int, counts: np.ndarray | None) -> dict[str, np.ndarray]:
    """Float32 top-k statistics, descending, as the reduction gives them for compact rows."""
    rng = np.random.default_rng(1)
    logits = np.sort(rng.normal(size=(rows, K)), axis=1)[:, ::-1].astype(np.float32)
    stats = {
        "has_token": np.ones(rows, bool),
        "token_logprob": -rng.uniform(0, 30, size=rows).astype(np.float32),
        "token_rank": np.arange(rows, dtype=np.int32),
        "logsumexp": (logits[:, 0] + 1).astype(np.float32),
        "entropy": rng.uniform(0, 2, size=rows).astype(np.float32),
        "topk_ids": rng.integers(0, 11, size=(rows, K)).astype(np.int32),
        "topk_logits": logits,
    }
    if counts is not None:
        stats["topk_count"] = counts.astype(np.int32)
    return stats


def test_plain_rows_with_top_p_keep_k_entries_padded():
    counts = np.array([1, 3, 2])
    stats = _topk_stats(3, counts)
    stats["topk_logits"] = stats["topk_logits"].astype(np.float16)
    schema = _schema()  # the plain schema is the same with and without top_p
    table = output_rows.to_table(
        schema, pa.array(["a"]), np.zeros(3, np.int64), np.arange(3), np.arange(3), stats
    )
    assert table.column("topk_ids").to_pylist()[0][1:] == [-1, -1]
    assert table.column("topk_ids").to_pylist()[2][:2] == stats["topk_ids"][2, :2].tolist()
    assert table.column("topk_logits").to_pylist()[2][2] == -np.inf


def test_compact_shard_has_its_encodings_and_id_order(out_dir):
    from lib import results
    from lib.output import compact

    schema = output_rows.output_schema(
        pa.string(), K, 11, "float16", full=False, encoding="compact"
    )
    assert schema.field("entropy").type == pa.float16() and "topk_logits" not in schema.names
    counts = np.array([3, 1, 2, 3])
    stats = _topk_stats(4, counts)
    table = output_rows.to_table(
        schema, pa.array(["a", "b"]), np.array([0, 0, 1, 1]), np.arange(4), np.arange(4), stats
    )
    shard = writer.ShardWriter(out_dir, "part-00004", schema, "parquet")
    shard.write(table)
    with pytest.raises(RuntimeError, match="written in one table"):
        shard.write(table)  # one id order per file: a second table would decode wrongly
    writer.commit([shard], _record(), _ok)
    path = out_dir / "tokens" / "part-00004.parquet"
    metadata = pq.read_metadata(path)
    encodings = {
        metadata.row_group(0).column(i).path_in_schema: metadata.row_group(0).column(i).encodings
        for i in range(metadata.num_columns)
    }
    for column, encoding in compact.COLUMN_ENCODINGS.items():
        assert encoding in encodings[column], column
    assert "RLE_DICTIONARY" in encodings["id"]
    fragment = next(iter(results.open_dataset(out_dir).get_fragments()))
    decoded = results.table_to_arrays(fragment.to_table(), results.shard_id_order(fragment), K)
    kept = np.arange(K) < counts[:, None]
    np.testing.assert_array_equal(decoded["topk_ids"][kept], stats["topk_ids"][kept])
    logprobs = stats["topk_logits"] - stats["logsumexp"][:, None]
    assert np.abs(decoded["topk_logprobs"][kept] - logprobs[kept]).max() <= 1 / 104 + 1e-6
    assert decoded["token_logprob"].dtype == np.float32
