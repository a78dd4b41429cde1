"""The run report: a page that renders for complete and partial runs, whose images decode and
are not blank, whose numbers are the manifest's, and that references nothing outside itself."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import extract
from jobs import report as report_cli
from lib import results
from lib.inspect import report, run_stats
from lib.output import layout
from tests.test_teacher import single_tokens

COMMON = ["input.max_length=12", "output.shard_rows=17", "model.dtype=float32"]
TOPK = ["input.id_column=doc_id", "output.k=5"]
ARROW_FULL = [
    "decoder.mode=targets",
    "input.target_column=target",
    "output.logits=full",
    "output.format=arrow",
]


def job(model: str, corpus: str, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"input.path={corpus}", f"output.dir={out}", *COMMON, *extra]


@pytest.fixture(scope="module")
def topk(tmp_path_factory, model_dirs, corpus) -> Path:
    """A causal top-k Parquet job run through the CLI with its end-of-run report."""
    out = tmp_path_factory.mktemp("report") / "topk"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("LOGIT_EXTRACT_NO_REPORT", raising=False)
        assert extract.main(job(model_dirs["gpt2"], corpus, out, *TOPK)) == 0
    return out


@pytest.fixture(scope="module")
def arrow_full(tmp_path_factory, model_dirs, corpus) -> tuple[Path, Path]:
    """A seq2seq `targets` job with full logits in Arrow files, and its report."""
    out = tmp_path_factory.mktemp("report") / "arrow-full"
    probes = f"output.probes={json.dumps(single_tokens(model_dirs['t5'], 2))}"
    assert extract.main(job(model_dirs["t5"], corpus, out, *ARROW_FULL, probes)) == 0
    assert not (out / layout.REPORT).exists()  # the test suite's jobs draw none by default
    page = out.parent / "page.html"
    assert report_cli.main([str(out), "--output", str(page)]) == 0
    return out, page


def numbers(page: str) -> dict[str, str]:
    """The page's numbers by their data-key (the first of each key)."""
    found = {}
    for key, value in re.findall(r'data-key="([^"]+)">([^<]*)<', page):
        found.setdefault(key, value)
    return found


def check_images(page: str) -> int:
    """Every image is an inline PNG that decodes and is not blank; returns how many."""
    images = re.findall(r"<img [^>]*>", page)
    for tag in images:
        data = re.fullmatch(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', tag)
        assert data, tag[:100]
        image = Image.open(io.BytesIO(base64.b64decode(data.group(1))))
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 300 and pixels.var() > 0
    return len(images)


def check_self_contained(page: str) -> None:
    outside = re.sub(r'src="data:image/png;base64,[^"]+"', "", page)
    assert "src=" not in outside and "href" not in outside
    for reference in ("<script", "<link", "@import", "url(", "http:", "https:", "//"):
        assert reference not in outside.lower(), reference


def test_report_of_a_topk_run(topk, capsys):
    manifest = results.read_manifest(topk)
    page = (topk / layout.REPORT).read_text()
    assert check_images(page) >= 8
    check_self_contained(page)
    totals, run = manifest["totals"], manifest["throughput"]
    found = numbers(page)
    for key in ("input_rows", "scored_rows", "skipped_rows", "truncated_rows", "output_rows"):
        assert found[key] == f"{totals[key]:,}", key
    assert found["tokens"] == f"{run['tokens']:,}"
    assert found["padded_tokens"] == f"{run['padded_tokens']:,}"
    assert found["positions"] == f"{totals['output_rows']:,}"  # one row per position
    assert found["units"] == str(len(list((topk / layout.UNITS).iterdir())))
    assert totals["skipped_rows"] > 0 and "skipped: empty_text" in page  # by reason
    assert totals["truncated_rows"] > 0
    assert "Complete" in page and "Partial output" not in page
    for section in ("run", "lengths", "batching", "throughput", "logprob", "rank", "mass"):
        assert f'<section id="{section}">' in page
    assert '<section id="calibration">' in page


def test_topk_statistics_equal_the_rows(topk):
    arrays = results.load_arrays(topk)
    stats = run_stats.scan_tokens(run_stats.read_run(topk))
    has = arrays["has_token"]
    assert stats.positions == len(has) and stats.scored == has.sum()
    assert stats.top1 == (arrays["token_rank"][has] == 0).sum()
    assert stats.logprob.mean == pytest.approx(arrays["token_logprob"][has].mean(), rel=1e-5)
    logprobs = results.topk_logprobs(arrays["topk_logits"], arrays["logsumexp"])
    assert stats.mass.mean == pytest.approx(np.exp(logprobs).sum(1).mean(), rel=1e-5)
    confidence = np.exp(logprobs[has, 0])
    correct = arrays["token_rank"][has] == 0
    expected = run_stats.Calibration()
    expected.add(confidence, correct.astype(float))
    assert stats.calibration.ece == pytest.approx(expected.ece)
    assert stats.calibration.counts.sum() == has.sum()
    assert stats.rank.sum() == has.sum()


def test_extract_keeps_the_report_of_a_complete_job(topk, model_dirs, corpus, monkeypatch, capsys):
    path = topk / layout.REPORT
    stamp = path.stat().st_mtime_ns
    monkeypatch.delenv("LOGIT_EXTRACT_NO_REPORT", raising=False)
    args = job(model_dirs["gpt2"], corpus, topk, *TOPK)
    assert extract.main(args) == 0  # already complete: the report stays as it is
    assert path.stat().st_mtime_ns == stamp
    assert not re.search(r"^  report ", capsys.readouterr().out, re.M)
    # A report drawn while the job ran (older than _SUCCESS, marked partial) is drawn again.
    success = (topk / layout.SUCCESS).stat().st_mtime
    os.utime(path, (success - 60, success - 60))
    assert extract.main(args) == 0
    assert path.stat().st_mtime > success
    assert re.search(r"^  report ", capsys.readouterr().out, re.M)

    def broken(out_dir):
        raise RuntimeError("no fonts\nat all")

    monkeypatch.setattr(report, "write_report", broken)
    path.unlink()
    assert extract.main(args) == 0  # a report that fails never fails the job
    assert capsys.readouterr().err.splitlines()[-1] == "warning: no report written: no fonts"
    assert extract.main([*args, "output.report=false"]) == 0
    assert not path.exists()


def test_report_of_arrow_full_seq2seq(arrow_full, capsys):
    out, page_path = arrow_full
    page = page_path.read_text()
    assert check_images(page) >= 8
    check_self_contained(page)
    manifest = results.read_manifest(out)
    found = numbers(page)
    assert found["scored_rows"] == f"{manifest['totals']['scored_rows']:,}"
    assert found["output_rows"] == f"{manifest['totals']['output_rows']:,}"
    assert found["tokens"] == f"{manifest['throughput']['tokens']:,}"
    assert '<section id="entropy">' in page  # from the full logits, or the entropy column
    assert '<section id="mass">' not in page  # full logits hold all the mass
    lengths = json.loads(next((out / layout.UNITS).glob("*.json")).read_text())["lengths"]
    assert "target" in lengths and "mean_target_length" in found
    # The probes' probabilities, one histogram each, their means beside them.
    assert '<section id="probes">' in page
    stats = run_stats.scan_tokens(run_stats.read_run(out))
    probes = np.exp(results.load_arrays(out)["probe_logprobs"])
    assert list(stats.probes) == manifest["config"]["output"]["probes"]
    for i, hist in enumerate(stats.probes.values()):
        assert hist.n == len(probes)
        assert hist.mean == pytest.approx(probes[:, i].mean(), abs=0.01)  # binned: 1/50 wide
        assert found[f"probe_{i}"] == f"{hist.mean:#.3g}"


def test_partial_output_is_drawn_from_committed_shards(topk, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(topk, out)
    for name in (layout.MANIFEST, layout.SUCCESS, layout.SKIPPED, layout.REPORT):
        (out / name).unlink(missing_ok=True)
    shards = layout.shard_files(out)
    shards[1].unlink()  # its record stays, and must not count
    records = [r for r in run_stats.read_run(out).records]
    assert len(records) == len(shards) - 1
    documents = out / layout.DOCUMENTS
    documents.mkdir()
    perplexity = np.geomspace(2, 900, 40)
    table = {"perplexity": perplexity, "bits_per_byte": np.linspace(0.5, 3, 40)}
    table["min_k_plus_plus"] = np.linspace(-4, 1, 40)
    pq.write_table(pa.table(table), documents / "part-00000.parquet")

    path, drawn = report.write_report(out)
    page = path.read_text()
    assert path == out / layout.REPORT and drawn.info.partial
    assert "Partial output" in page and check_images(page) >= 9
    found = numbers(page)
    assert found["scored_rows"] == f"{sum(r.scored_rows for r in records):,}"
    kept = sum(pq.read_metadata(p).num_rows for p in shards if p.exists())
    assert found["positions"] == f"{kept:,}" == found["output_rows"]
    assert found["documents"] == "40"
    assert float(found["median_perplexity"]) == pytest.approx(np.median(perplexity), rel=0.15)
    assert '<section id="documents">' in page


def test_cli_refuses_what_is_not_an_output_directory(tmp_path, capsys):
    assert report_cli.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'} does not exist\n"
    (tmp_path / "notes.txt").write_text("x")
    assert report_cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not an output directory" in err
    assert len(err.splitlines()) == 1


def test_cli_names_a_damaged_shard_in_one_line(topk, tmp_path, capsys):
    out = tmp_path / "damaged"
    shutil.copytree(topk, out)
    shard = layout.shard_files(out)[0]
    with open(shard, "r+b") as handle:
        handle.truncate(100)
    assert report_cli.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read {shard}: ") and "jobs.verify" in err
    assert len(err.splitlines()) == 1
