"""`logit-extract export OUT DEST`: a plain-encoded copy of a compact or top-p output that any
Parquet client reads, equal to what lib.results decodes, with a manifest of its own."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import export as export_job
from jobs import extract
from jobs import report as report_job
from lib import results
from lib.inspect import run_stats
from lib.inspect.verify import verify
from tests.conftest import write_rows

OUTPUTS = {
    "compact": ["output.encoding=compact", "output.samples=3", "output.temperatures=[2.0]"],
    "compact-top-p": ["output.encoding=compact", "output.top_p=0.9", "output.min_k=2"],
    "plain-top-p": ["output.top_p=0.9", "output.min_k=2", "output.level=both"],
    "plain-arrow": ["output.format=arrow", "output.dtype=float32"],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, peaked_dir, texts) -> dict:
    """Each output of the peaked 32k model, and its export."""
    root = tmp_path_factory.mktemp("export")
    corpus = write_rows(root / "corpus.parquet", texts[:30] + [None], ids=list(range(31)))
    base = [
        f"model.path={peaked_dir}",
        f"input.path={corpus}",
        "input.id_column=doc_id",
        "input.max_length=16",
        "output.k=16",
        "output.shard_rows=12",
        "runtime.threads=1",
    ]
    found = {}
    for name, extra in OUTPUTS.items():
        out, dest = root / name, root / f"{name}-plain"
        assert extract.main([*base, f"output.dir={out}", *extra]) == 0
        assert export_job.main([str(out), str(dest)]) == 0
        found[name] = (out, dest)
    return found


@pytest.mark.parametrize("name", OUTPUTS)
def test_the_export_reads_as_the_decoded_arrays(name, exported):
    """lib.results reads the export exactly as it decodes the source; a plain pyarrow read of
    the export holds each row's kept entries as lists; verify checks the export."""
    out, dest = exported[name]
    source, copy = results.load_arrays(out), results.load_arrays(dest)
    assert set(copy) >= {"topk_ids", "topk_logprobs", "topk_count", "logsumexp"}
    for key in ("id", "position", "token_id", "token_rank", "topk_ids", "topk_count"):
        np.testing.assert_array_equal(copy[key], source[key], err_msg=key)
    for key in ("token_logprob", "logsumexp", "entropy", "topk_logprobs"):
        np.testing.assert_array_equal(copy[key], source[key].astype(np.float32), err_msg=key)
    for key in ("sample_ids", "sample_logprobs", "logsumexp_t"):  # teacher columns as stored
        assert (key in copy) == (key in source) == (name == "compact"), key
        if key in source:
            np.testing.assert_array_equal(copy[key], source[key], err_msg=key)
    fmt = "arrow" if "arrow" in name else "parquet"
    table = results.open_dataset(dest).to_table()
    ids, logprobs = table.column("topk_ids").to_pylist(), table.column("topk_logprobs").to_pylist()
    count = source["topk_count"]
    assert [len(row) for row in ids] == count.tolist()
    assert ids == [row[:n].tolist() for row, n in zip(source["topk_ids"], count, strict=True)]
    assert np.allclose(logprobs[0], source["topk_logprobs"][0][: count[0]])
    report = verify(dest, check_input=True)
    assert report.problems == [], report.problems
    assert report.output_rows == len(source["position"])
    assert results.read_manifest(dest)["exported_from"] == str(out)
    assert fmt in results.output_format(dest)


def test_the_manifest_counts_the_positions_top_p_left_at_k(exported):
    """totals.topk_capped: the token rows whose kept entries are all k (the summary says so
    when they are most)."""
    out, _ = exported["compact-top-p"]
    arrays = results.load_arrays(out)
    capped = int((arrays["topk_count"] == 16).sum())
    assert 0 < capped < len(arrays["topk_count"])
    assert results.read_manifest(out)["totals"]["topk_capped"] == capped


def test_generic_clients_read_the_export_without_this_project(exported):
    """DuckDB sees the compact output's ids only as codes; the export's as ids."""
    out, dest = exported["compact-top-p"]
    source = results.load_arrays(out)
    first = duckdb.sql(
        f"SELECT topk_ids[1], len(topk_ids) FROM '{dest}/tokens/*.parquet' "
        "ORDER BY id, position LIMIT 1"
    ).fetchall()[0]
    order = np.lexsort((source["position"], source["id"]))[0]
    assert first == (source["topk_ids"][order, 0], source["topk_count"][order])
    assert pq.read_schema(next((dest / "tokens").iterdir())).field("topk_ids").type.value_type


@pytest.mark.parametrize("name", ["compact", "plain-top-p"])
def test_the_report_of_an_export_draws_what_its_source_draws(name, exported):
    """The report reads the export's list columns: the same top-k mass, calibration and ranks
    as from the source's columns."""
    out, dest = exported[name]
    source = run_stats.scan_tokens(run_stats.read_run(out))
    copy = run_stats.scan_tokens(run_stats.read_run(dest))
    assert copy.positions == source.positions > 0 and copy.top1 == source.top1
    np.testing.assert_array_equal(copy.rank, source.rank)
    assert copy.mass.n == source.mass.n
    np.testing.assert_allclose(copy.mass.total, source.mass.total, rtol=1e-5)
    np.testing.assert_allclose(copy.mass.counts, source.mass.counts, atol=1)
    for field in ("counts", "confidence", "correct"):
        expected = getattr(source.calibration, field)
        np.testing.assert_allclose(getattr(copy.calibration, field), expected, rtol=1e-5)
    if name == "compact":  # the page draws from these (once is enough: a second is a second)
        assert report_job.main([str(dest)]) == 0
        page = (dest / "_report.html").read_text()
        assert f"a plain copy of {out}" in page  # not "0 committed units"
        assert 'data-key="units"' not in page and "committed units" not in page


def test_what_cannot_be_exported_is_one_line(exported, tmp_path, capsys, model_dirs, texts):
    out, dest = exported["compact"]
    assert export_job.main([str(out), str(dest)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert export_job.main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "no finished output" in capsys.readouterr().err
    corpus = write_rows(tmp_path / "c.parquet", texts[:5])
    full = tmp_path / "full"
    argv = [f"model.path={model_dirs['gpt2']}", f"input.path={corpus}", f"output.dir={full}"]
    assert extract.main([*argv, "output.logits=full"]) == 0
    capsys.readouterr()
    assert export_job.main([str(full), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "full logits" in err and len(err.splitlines()) == 1
