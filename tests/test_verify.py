"""jobs.verify: a finished job passes; each kind of damage gets its own one-line finding."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import extract, verify
from lib import sample
from tests.conftest import write_rows

ROOT = Path(__file__).resolve().parents[1]
ROWS = 40
NULLS = (5, 17)  # rows with a null text: recorded in _skipped/skipped.parquet


@pytest.fixture(scope="module")
def job(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """One finished job per output format over a corpus with skipped rows, shared by the tests."""
    root = tmp_path_factory.mktemp("verify")
    texts = sample.generate_texts(ROWS, seed=31, mean_words=6)
    for row in NULLS:
        texts[row] = None
    corpus = write_rows(root / "corpus.parquet", texts, ids=[f"d{i}" for i in range(ROWS)])
    outputs = {"corpus": Path(corpus)}
    for fmt in ("parquet", "arrow"):
        out = root / fmt
        argv = [
            f"model.path={model_dirs['gpt2']}",
            f"input.path={corpus}",
            "input.id_column=doc_id",
            f"output.dir={out}",
            "output.k=4",
            "output.shard_rows=8",
            f"output.format={fmt}",
            "input.max_length=16",
        ]
        assert extract.main(argv) == 0
        outputs[fmt] = out
    return outputs


def check(out: Path, *args: str, capsys) -> tuple[int, list[str], str]:
    """Run jobs.verify in-process; returns the exit status, the problem lines and stdout."""
    status = verify.main([str(out), *args])
    captured = capsys.readouterr()
    return status, captured.err.splitlines(), captured.out


@pytest.fixture
def damaged(job, tmp_path) -> Path:
    """A copy of the finished Parquet job to damage."""
    return Path(shutil.copytree(job["parquet"], tmp_path / "out"))


def _manifest(out: Path) -> dict:
    return json.loads((out / "_manifest.json").read_text())


def _edit_manifest(out: Path, edit) -> None:
    manifest = _manifest(out)
    edit(manifest)
    (out / "_manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_finished_job_passes(job, capsys, fmt):
    manifest = _manifest(job[fmt])
    status, problems, out = check(job[fmt], capsys=capsys)
    assert (status, problems) == (0, [])
    assert out == f"OK {job[fmt]}: 5 shards, {manifest['totals']['output_rows']:,} rows\n"
    # --input with no path takes input.path and input.id_column from the manifest.
    status, problems, out = check(job[fmt], "--input", capsys=capsys)
    assert (status, problems) == (0, [])
    assert out.endswith(f", {ROWS} input ids accounted for\n")
    assert manifest["totals"]["skipped_rows"] == len(NULLS)
    assert {s["rank"] for s in manifest["shards"]} == {0}


def test_explicit_input_and_id_column(job, capsys):
    status, problems, _ = check(
        job["parquet"], "--input", str(job["corpus"]), "--id-column", "doc_id", capsys=capsys
    )
    assert (status, problems) == (0, [])


def test_truncated_parquet_shard(damaged, capsys):
    shard = damaged / "tokens" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])  # a killed writer leaves no footer
    size = shard.stat().st_size
    status, problems, _ = check(damaged, capsys=capsys)
    assert status == 1
    assert problems[0] == (
        f"{damaged}: shard tokens/part-00001.parquet has {size:,} bytes, the job committed "
        f"{size + 100:,}"
    )
    assert problems[1].startswith(f"{damaged}: shard tokens/part-00001.parquet is not readable: ")
    assert len(problems[1].splitlines()) == 1


def test_truncated_arrow_shard(job, tmp_path, capsys):
    out = Path(shutil.copytree(job["arrow"], tmp_path / "out"))
    shard = out / "tokens" / "part-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-64])
    status, problems, _ = check(out, capsys=capsys)
    assert status == 1
    assert problems[0].startswith(f"{out}: shard tokens/part-00002.arrow has ")
    assert problems[1].startswith(f"{out}: shard tokens/part-00002.arrow is not readable: ")


def test_flipped_bytes_that_still_decode(damaged, capsys):
    """Damage inside the values' data decodes fine: only the checksum can tell."""
    shard = damaged / "tokens" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    status, problems, _ = check(damaged, capsys=capsys)
    assert status == 1
    assert problems[0] == (
        f"{damaged}: shard tokens/part-00001.parquet does not match its checksum "
        "(damaged or changed after it was committed)"
    )


def test_missing_success_and_temporary_files(damaged, capsys):
    (damaged / "_SUCCESS").unlink()
    (damaged / "_tmp" / "part-00003.parquet@host@12@34.tmp").write_bytes(b"PAR1")
    status, problems, _ = check(damaged, capsys=capsys)
    assert status == 1
    assert problems == [
        f"{damaged}: _SUCCESS is missing: the job has not finished",
        f"{damaged}: temporary file _tmp/part-00003.parquet@host@12@34.tmp left behind",
    ]


def test_duplicate_rows_in_a_shard(damaged, capsys):
    shard = damaged / "tokens" / "part-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(pa.concat_tables([table, table.slice(3, 2)]), shard)
    status, problems, _ = check(damaged, capsys=capsys)
    first = table.slice(3, 1).to_pylist()[0]
    assert status == 1
    assert (
        f"{damaged}: shard tokens/part-00000.parquet has 2 duplicate (id, position) rows, "
        f"e.g. id {first['id']!r} position {first['position']}"
    ) in problems
    assert (
        f"{damaged}: shard tokens/part-00000.parquet has {table.num_rows + 2} rows, "
        f"the manifest says {table.num_rows}" in problems
    )


def test_rows_of_one_id_in_two_shards(damaged, capsys):
    """The same (id, position) twice across shards: each shard alone looks fine."""
    first, second = (
        damaged / "tokens" / "part-00000.parquet",
        damaged / "tokens" / "part-00001.parquet",
    )
    moved = pq.read_table(first).slice(0, 1)
    pq.write_table(pa.concat_tables([pq.read_table(second), moved]), second)
    _edit_manifest(
        damaged,
        lambda m: (
            m["shards"][1].update(rows=m["shards"][1]["rows"] + 1),
            m["totals"].update(output_rows=m["totals"]["output_rows"] + 1),
        ),
    )
    status, problems, _ = check(damaged, capsys=capsys)
    assert (status, problems) == (
        1,
        [
            f"{damaged}: shard tokens/part-00001.parquet has {second.stat().st_size:,} bytes, "
            f"the job committed {_manifest(damaged)['shards'][1]['bytes']:,}",
            f"{damaged}: 1 ids have rows in more than one shard, e.g. "
            f"{moved['id'][0].as_py()!r} in tokens/part-00000.parquet, tokens/part-00001.parquet",
        ],
    )


def test_manifest_counts_and_schema_must_match(damaged, capsys):
    def edit(manifest):
        manifest["shards"][2]["rows"] += 1
        manifest["schema"][-1]["type"] = "fixed_size_list<item: float>[4]"

    rows = _manifest(damaged)["shards"][2]["rows"]
    _edit_manifest(damaged, edit)
    status, problems, _ = check(damaged, capsys=capsys)
    assert status == 1
    schema_lines = [p for p in problems if "schema differs" in p]
    assert len(schema_lines) == 5  # one per shard
    assert schema_lines[0] == (
        f"{damaged}: shard tokens/part-00000.parquet: schema differs from the manifest: column "
        "topk_logits is fixed_size_list<halffloat>[4] not null, the manifest says "
        "fixed_size_list<float>[4] not null"
    )
    assert (
        f"{damaged}: shard tokens/part-00002.parquet has {rows} rows, the manifest says {rows + 1}"
        in problems
    )
    assert any(p.startswith(f"{damaged}: manifest totals.output_rows is ") for p in problems)


def test_missing_and_unlisted_shards(damaged, job, capsys):
    (damaged / "tokens" / "part-00004.parquet").rename(damaged / "tokens" / "part-00099.parquet")
    status, problems, _ = check(damaged, "--input", capsys=capsys)
    assert status == 1
    assert (
        f"{damaged}: shard tokens/part-00004.parquet is listed in the manifest but missing"
        in problems
    )
    assert (
        f"{damaged}: tokens/part-00099.parquet is not listed in the manifest (readers would "
        "read it as rows)" in problems
    )


def test_input_ids_neither_scored_nor_skipped(damaged, capsys):
    (damaged / "tokens" / "part-00004.parquet").unlink()
    skipped = pq.read_table(damaged / "_skipped/skipped.parquet")
    pq.write_table(skipped.slice(1), damaged / "_skipped/skipped.parquet")  # drops d5
    status, problems, _ = check(damaged, "--input", capsys=capsys)
    assert status == 1
    assert (
        f"{damaged}: 9 input ids are neither in the output nor in _skipped/skipped.parquet, "
        "e.g. 'd5', 'd32', 'd33'" in problems
    )
    assert (
        f"{damaged}: manifest totals.skipped_rows is 2, _skipped/skipped.parquet has 1 rows"
        in problems
    )


def test_input_ids_both_scored_and_skipped(damaged, capsys):
    skipped = pa.table({"id": ["d5", "d17", "d0"], "reason": ["null_text", "null_text", "bogus"]})
    pq.write_table(skipped, damaged / "_skipped/skipped.parquet")
    status, problems, _ = check(damaged, capsys=capsys)
    assert status == 1
    assert (
        f"{damaged}: 1 ids are both in the output and in _skipped/skipped.parquet, e.g. 'd0'"
        in problems
    )
    status, problems, _ = check(damaged, "--input", capsys=capsys)
    assert (
        f"{damaged}: 1 input ids are both in the output and in _skipped/skipped.parquet, e.g. 'd0'"
        in problems
    )


def test_totals_must_add_up(damaged, capsys):
    _edit_manifest(damaged, lambda m: m["totals"].update(input_rows=m["totals"]["input_rows"] + 1))
    status, problems, _ = check(damaged, capsys=capsys)
    assert (status, problems) == (
        1,
        [
            f"{damaged}: manifest totals: input_rows {ROWS + 1} != scored_rows "
            f"{ROWS - len(NULLS)} + skipped_rows {len(NULLS)}"
        ],
    )
    status, problems, _ = check(damaged, "--input", capsys=capsys)
    assert (
        f"{damaged}: manifest totals.input_rows is {ROWS + 1}, the input has {ROWS} rows"
        in problems
    )


def test_output_ids_not_in_the_input(damaged, tmp_path, capsys):
    smaller = write_rows(tmp_path / "smaller.parquet", ["a", "b"], ids=["d0", "d1"])
    status, problems, _ = check(damaged, "--input", smaller, capsys=capsys)
    assert status == 1
    assert (
        f"{damaged}: {ROWS - len(NULLS) - 2} ids in the output are not input ids, "
        "e.g. 'd2', 'd3', 'd4'" in problems
    )
    assert (
        f"{damaged}: 2 ids in _skipped/skipped.parquet are not input ids, e.g. 'd5', 'd17'"
        in problems
    )


def test_bad_manifest_and_missing_input(damaged, tmp_path, capsys):
    status, problems, _ = check(
        damaged, "--input", str(tmp_path / "nothing*.parquet"), capsys=capsys
    )
    assert status == 1 and len(problems) == 1
    assert problems[0].startswith(
        f"{damaged}: input: input.path {tmp_path}/nothing*.parquet: no file matches"
    )
    (damaged / "_manifest.json").write_text("{not json")
    status, problems, _ = check(damaged, capsys=capsys)
    assert status == 1 and len(problems) == 1
    assert problems[0] == f"{damaged}: _manifest.json is not readable JSON"


def test_command_line_prints_one_line_per_problem(damaged, tmp_path, capsys):
    (damaged / "tokens" / "part-00000.parquet").write_bytes(b"not a parquet file")
    (damaged / "_SUCCESS").unlink()
    run = subprocess.run(
        [sys.executable, "-m", "jobs.verify", str(damaged), "--input"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and run.stdout == ""
    lines = run.stderr.splitlines()
    assert "Traceback" not in run.stderr and all(line.startswith(f"{damaged}: ") for line in lines)
    assert lines[:3] == [
        f"{damaged}: _SUCCESS is missing: the job has not finished",
        f"{damaged}: shard tokens/part-00000.parquet has 18 bytes, the job committed "
        f"{_manifest(damaged)['shards'][0]['bytes']:,}",
        f"{damaged}: shard tokens/part-00000.parquet is not readable: Parquet magic bytes not found "
        "in footer. Either the file is corrupted or this is not a parquet file.",
    ]
    missing = subprocess.run(
        [sys.executable, "-m", "jobs.verify", str(tmp_path / "absent")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (missing.returncode, missing.stderr) == (
        2,
        f"error: {tmp_path / 'absent'} does not exist\n",
    )
    (tmp_path / "a-file").write_text("x")
    assert verify.main([str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'a-file'} is a file, not an output directory\n"
    )


def test_an_unreadable_location_is_one_line(capsys):
    assert verify.main(["weird://bucket/out"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "error: weird://bucket: neither pyarrow nor an installed fsspec package reads weird://\n"
    )


def test_compact_output_reports_its_bytes_per_position_and_entry(job, model_dirs, tmp_path, capsys):
    out = tmp_path / "compact"
    argv = [
        f"model.path={model_dirs['gpt2']}",
        f"input.path={job['corpus']}",
        f"output.dir={out}",
        "output.k=4",
        "output.shard_rows=8",
        "input.max_length=16",
        "output.encoding=compact",
    ]
    assert extract.main(argv) == 0
    capsys.readouterr()
    manifest = _manifest(out)
    positions = manifest["totals"]["output_rows"]
    assert manifest["totals"]["topk_entries"] == 4 * positions
    size = sum(s["bytes"] for s in manifest["shards"])
    status, problems, printed = check(out, capsys=capsys)
    assert (status, problems) == (0, [])
    assert printed == (
        f"OK {out}: 5 shards, {positions:,} rows; {size / positions:.1f} bytes/position, "
        f"{size / (4 * positions):.2f} bytes/entry (4.0 top-k entries/position)\n"
    )
    # The entries the manifest counts are the ones the shards' footers hold.
    _edit_manifest(out, lambda m: m["totals"].update(topk_entries=7))
    status, problems, _ = check(out, capsys=capsys)
    assert status == 1
    assert problems == [
        f"{out}: manifest totals.topk_entries is 7, the shards' footers hold {4 * positions:,}"
    ]
