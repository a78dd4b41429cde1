"""lib/extract/corpus.py: input discovery, work units, and reading exactly a unit's rows and ids."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.config import InputConfig
from lib.errors import UserError
from lib.extract.corpus import (
    InputFile,
    WorkUnit,
    check_unique_ids,
    find_input_files,
    id_type,
    inspect_inputs,
    invalid_utf8,
    plan_units,
    read_unit,
)
from tests.conftest import write_rows


def touch_parquet(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_rows(path, ["x"])


@pytest.fixture
def tree(tmp_path):
    """A directory of Parquet files, nested, plus files the finder must ignore."""
    for name in (
        "b.parquet",
        "a.parquet",
        "sub/c.parquet",
        "sub/deeper/d.parquet",
        "_units/e.parquet",
        ".hidden/f.parquet",
        ".g.parquet",
    ):
        touch_parquet(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not input")
    (tmp_path / "spark.parquet").mkdir()  # Spark writes directories with a .parquet name
    touch_parquet(tmp_path / "spark.parquet" / "part-0.parquet")
    return tmp_path


def test_find_single_file(tree):
    assert find_input_files(str(tree / "a.parquet")) == [str(tree / "a.parquet")]


def test_find_directory_recursively_sorted_skipping_hidden_and_underscore(tree, caplog):
    expected = [
        "a.parquet",
        "b.parquet",
        "spark.parquet/part-0.parquet",
        "sub/c.parquet",
        "sub/deeper/d.parquet",
    ]
    with caplog.at_level(logging.INFO, logger="lib.extract.corpus"):
        assert find_input_files(str(tree)) == [str(tree / name) for name in expected]
    # -v names what was left out
    assert caplog.messages == [
        f"input.path {tree}: 5 *.parquet files read; 4 others ignored (not *.parquet, or under "
        "a name starting with . or _): .g.parquet, .hidden/f.parquet, _units/e.parquet, notes.txt"
    ]


def test_find_glob_sorted(tree):
    # glob skips hidden names, and a directory named *.parquet is not a file
    assert find_input_files(str(tree / "*.parquet")) == [
        str(tree / "a.parquet"),
        str(tree / "b.parquet"),
    ]
    assert find_input_files(str(tree / "sub/**/*.parquet")) == [
        str(tree / "sub/c.parquet"),
        str(tree / "sub/deeper/d.parquet"),
    ]


def test_find_errors_name_the_pattern(tmp_path):
    with pytest.raises(
        UserError,
        match=r"^input.path .*/nothing\*.parquet: no file matches this "
        r"pattern$",
    ):
        find_input_files(str(tmp_path / "nothing*.parquet"))
    with pytest.raises(
        UserError, match=r"^input.path .*/missing.parquet: no such file or directory$"
    ):
        find_input_files(str(tmp_path / "missing.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        UserError, match=r"^input.path .*/empty: directory holds no \*.parquet files$"
    ):
        find_input_files(str(tmp_path / "empty"))


def test_plan_units_numbering_offsets_and_sizes():
    inputs = [InputFile("a", 10, 0), InputFile("b", 0, 0), InputFile("c", 7, 0)]
    units = plan_units(inputs, shard_rows=4)
    assert units == [
        WorkUnit(0, "a", 0, 4, 0),
        WorkUnit(1, "a", 4, 8, 4),
        WorkUnit(2, "a", 8, 10, 8),
        WorkUnit(3, "c", 0, 4, 10),
        WorkUnit(4, "c", 4, 7, 14),
    ]
    assert [u.name for u in units] == [f"part-{i:05d}" for i in range(5)]
    assert plan_units(inputs, shard_rows=4) == units  # stable across runs
    assert plan_units(inputs, shard_rows=100) == [
        WorkUnit(0, "a", 0, 10, 0),
        WorkUnit(1, "c", 0, 7, 10),
    ]


@pytest.fixture
def two_files(tmp_path):
    """23 + 9 rows in row groups of 7, so units cross row-group boundaries."""
    a = write_rows(
        tmp_path / "a.parquet",
        [f"text {i}" for i in range(23)],
        [f"target {i}" for i in range(23)],
        [f"id-{i}" for i in range(23)],
    )
    write_rows(
        tmp_path / "b.parquet",
        [f"text {i}" for i in range(23, 32)],
        [f"target {i}" for i in range(23, 32)],
        [f"id-{i}" for i in range(23, 32)],
    )
    assert pq.ParquetFile(a).metadata.num_row_groups == 4
    return tmp_path


@pytest.mark.parametrize("shard_rows", [1, 5, 7, 8, 100])
def test_read_unit_returns_exactly_the_units_rows(two_files, shard_rows):
    cfg = InputConfig(path=str(two_files), id_column="doc_id", target_column="target")
    inputs = inspect_inputs(cfg)
    assert [i.rows for i in inputs] == [23, 9]
    seen = []
    for unit in plan_units(inputs, shard_rows):
        table = read_unit(unit, cfg).table
        assert table.column_names == ["id", "text", "target"]
        rows = range(unit.row_offset, unit.row_offset + unit.rows)
        assert table.column("id").to_pylist() == [f"id-{i}" for i in rows]
        assert table.column("text").to_pylist() == [f"text {i}" for i in rows]
        assert table.column("target").to_pylist() == [f"target {i}" for i in rows]
        seen += table.column("id").to_pylist()
    assert seen == [f"id-{i}" for i in range(32)]


def test_read_unit_without_id_column_uses_global_row_index(two_files):
    cfg = InputConfig(path=str(two_files))
    units = plan_units(inspect_inputs(cfg), 6)
    assert id_type(inspect_inputs(cfg), cfg) == pa.int64()
    ids = [i for unit in units for i in read_unit(unit, cfg).table.column("id").to_pylist()]
    assert ids == list(range(32))
    last = read_unit(units[-1], cfg).table
    assert last.column_names == ["id", "text"]
    assert last.column("text").to_pylist() == [
        "text 29",
        "text 30",
        "text 31",
    ]  # b.parquet rows 6-8


def test_integer_ids_and_categorical_strings(tmp_path):
    """int32 ids come out as int64; dictionary-encoded (categorical) text as plain strings."""
    path = tmp_path / "cat.parquet"
    text = pa.array(["b", "a", "b", None]).dictionary_encode()
    pq.write_table(pa.table({"text": text, "doc_id": pa.array([5, 6, 7, 8], pa.int32())}), path)
    cfg = InputConfig(path=str(path), id_column="doc_id")
    inputs = inspect_inputs(cfg)
    assert id_type(inputs, cfg) == pa.int64()
    table = read_unit(plan_units(inputs, 10)[0], cfg).table
    assert table.schema == pa.schema([("id", pa.int64()), ("text", pa.string())])
    assert table.to_pydict() == {"id": [5, 6, 7, 8], "text": ["b", "a", "b", None]}


def test_duplicate_ids_across_files_name_the_id_and_files(tmp_path):
    write_rows(tmp_path / "a.parquet", ["x", "y"], ids=["one", "two"])
    write_rows(tmp_path / "b.parquet", ["z"], ids=["two"])
    cfg = InputConfig(path=str(tmp_path), id_column="doc_id")
    with pytest.raises(UserError) as caught:
        check_unique_ids(inspect_inputs(cfg), cfg)
    assert str(caught.value) == (
        "input.id_column: id 'two' occurs 2 times (in a.parquet, b.parquet); "
        "ids in column 'doc_id' must be unique"
    )


def test_null_ids_are_refused(tmp_path):
    write_rows(tmp_path / "a.parquet", ["x", "y"], ids=["one", None])
    cfg = InputConfig(path=str(tmp_path), id_column="doc_id")
    with pytest.raises(
        UserError,
        match=r"column 'doc_id' in .*a.parquet has 1 null id\(s\); every row "
        r"needs an id$",
    ):
        check_unique_ids(inspect_inputs(cfg), cfg)


def test_mixed_id_types_across_files_are_refused(tmp_path):
    write_rows(tmp_path / "a.parquet", ["x"], ids=["one"])
    write_rows(tmp_path / "b.parquet", ["y"], ids=[2])
    with pytest.raises(
        UserError,
        match=r"^input.id_column: column 'doc_id' in .*b.parquet has type "
        r"int64, other files have string$",
    ):
        inspect_inputs(InputConfig(path=str(tmp_path), id_column="doc_id"))


def test_float_ids_are_refused(tmp_path):
    write_rows(tmp_path / "a.parquet", ["x"], ids=[1.5])
    with pytest.raises(UserError, match="has type double; expected integers or strings$"):
        inspect_inputs(InputConfig(path=str(tmp_path), id_column="doc_id"))


def test_file_that_shrank_after_planning_is_an_error_not_a_silent_loss(tmp_path):
    path = write_rows(tmp_path / "a.parquet", [f"t{i}" for i in range(20)])
    cfg = InputConfig(path=path)
    units = plan_units(inspect_inputs(cfg), 8)
    write_rows(tmp_path / "a.parquet", [f"t{i}" for i in range(10)])
    with pytest.raises(
        UserError, match=r"a.parquet changed while the job ran \(its bytes are not "
    ):
        read_unit(units[0], cfg)


def test_unreadable_row_group_names_the_file(tmp_path):
    """A valid footer over corrupt data pages: the read fails with the file and rows named."""
    path = tmp_path / "a.parquet"
    pq.write_table(
        pa.table({"text": [f"text number {i} " * 20 for i in range(200)]}),
        path,
        compression="zstd",
        row_group_size=100,
        use_dictionary=False,
    )
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    with open(path, "r+b") as handle:  # garble the second row group's page bodies, keep the footer
        handle.seek(chunk.data_page_offset + 32)
        handle.write(b"\xff" * (chunk.total_compressed_size - 64))
    cfg = InputConfig(path=str(path))
    units = plan_units(inspect_inputs(cfg), 100)
    assert read_unit(units[0], cfg).table.num_rows == 100
    with pytest.raises(UserError, match=r"^input file .*a.parquet: cannot read rows 100-199: "):
        read_unit(units[1], cfg)


def test_uint64_ids_beyond_int64_are_refused(tmp_path):
    path = tmp_path / "a.parquet"
    ids = pa.array([1, 2**63 + 5], pa.uint64())
    pq.write_table(pa.table({"text": ["x", "y"], "doc_id": ids}), path)
    cfg = InputConfig(path=str(path), id_column="doc_id")
    with pytest.raises(
        UserError,
        match=r"^input.id_column: column 'doc_id' in .*a.parquet does not "
        r"fit int64 ids: ",
    ):
        check_unique_ids(inspect_inputs(cfg), cfg)


@pytest.mark.parametrize("kind", ["string", "large_string", "string_view", "dictionary"])
def test_invalid_utf8_finds_the_rows_in_every_string_type(kind):
    """Bytes that are not UTF-8 (a stray byte, an encoded surrogate) in every string layout."""
    raw = pa.array([b"ok", b"\xff bad", None, b"\xed\xa0\x80 surrogate", b"fine"], pa.binary())
    text = raw.view(pa.string())
    column = {
        "string": text,
        "large_string": raw.cast(pa.large_binary()).view(pa.large_string()),
        "string_view": text.cast(pa.string_view()),
        "dictionary": pa.DictionaryArray.from_arrays(pa.array([0, 1, 0, 3, 4]), text),
    }[kind]
    assert invalid_utf8(pa.chunked_array([column, column])).tolist() == [1, 3, 6, 8]
