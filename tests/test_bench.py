"""The benchmark runs end to end (a smoke run: figures from it are not measurements)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from lib import cli
from lib.bench import baselines, command, encodings, runs, workloads
from lib.bench.teacher import SETTINGS


def test_case_corpora_have_their_length_mix():
    for case in workloads.CASES:
        texts = workloads.case_texts(case, 400)
        assert len(texts) == 400 and all(texts), case
        assert workloads.case_texts(case, 50) == texts[:50], case  # N is a prefix of 3N
    words = {
        case: np.array([len(t.split()) for t in workloads.case_texts(case, 400)])
        for case in workloads.CASES
    }
    assert words["tiny"].min() == 1 and words["tiny"].max() == 4
    assert 25 <= words["narrow"].min() and words["narrow"].max() <= 60
    assert words["lognormal"].min() < 10 and words["lognormal"].max() > 200
    assert 0.2 < (words["heavy-tail"] >= 500).mean() < 0.3  # cut at 512 tokens
    assert np.median(words["heavy-tail"]) < 40


def _python_through(launcher):
    """bench's `python -m` children as fork-server children, and `python -c` code run here."""

    def run(argv: list[str]) -> str:
        if argv[0] == "-c":  # the bare imports: this process has them already
            exec(argv[1], {})
            return ""
        result = launcher.start(argv[2:], module=argv[1]).wait()
        result.assert_exit(0)
        return result.stdout

    return run


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert math.isfinite(row[key]) and row[key] > 0, (row, key)


def _finite(row: dict, *keys: str) -> None:
    # Marginal figures of a smoke run are noise (even negative), but they must be computed.
    for key in keys:
        assert math.isfinite(row[key]), (row, key)


def _check_teacher(rows: list[dict]) -> None:
    """The teacher part: every setting, the baseline at 1, more samples more bytes."""
    teacher = {row["setting"]: row for row in rows}
    assert list(teacher) == [name for name, _ in SETTINGS]
    assert teacher["none"]["time_vs_none"] == 1 and teacher["none"]["added_bytes_per_position"] == 0
    for name in ("probes=2", "temperatures=2", "samples=12", "all"):
        _positive(teacher[name], "seconds", "time_vs_none", "added_bytes_per_position")
    assert (
        teacher["samples=64"]["added_bytes_per_position"]
        > teacher["samples=12"]["added_bytes_per_position"]
    )


@pytest.mark.slow
def test_bench_quick_reports_every_figure(tmp_path, capsys, launcher):
    out, work = tmp_path / "bench.json", tmp_path / "work"
    threads = torch.get_num_threads()
    try:  # in this process: `make bench` runs the same main(), without a second torch import
        argv = ["--quick", "--work", str(work), "--json", str(out)]
        parser = cli.Parser()
        command.add_arguments(parser)
        assert command.benchmark(parser.parse_args(argv), _python_through(launcher)) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    results = json.loads(out.read_text())
    efficiency = {row["model"]: row for row in results["efficiency"]}
    assert set(efficiency) == {"t5-tiny", "gpt2-tiny"}
    for row in efficiency.values():
        _positive(row, "job_tok_s", "dense_tok_s", "complete_rerun_s")
        _finite(
            row,
            "efficiency",
            "pipeline_efficiency",
            "model_on_job_batches_tok_s",
            "job_marginal_tok_s",
        )
        assert 0 < row["padding_efficiency"] <= 1
        assert 0 < row["input_checksum_share"] < 1
    # level documents against top-k token rows, for the causal model (T5 start has no tokens)
    _positive(efficiency["gpt2-tiny"], "tokens_level_s", "documents_level_s")
    assert "documents_vs_tokens_time" not in efficiency["t5-tiny"]
    cases = {(row["case"], row["model"]): row for row in results["cases"]}
    assert set(cases) == {("lognormal", "t5-tiny")}  # --quick: the first model only
    for row in cases.values():
        _positive(row, "rows_N", "tokens_per_row", "e2e_job_s", "e2e_naive_s", "e2e_speedup")
        _finite(row, "job_marginal_tok_s", "naive_marginal_tok_s", "steady_speedup")
        assert 0 < row["padding_efficiency"] <= 1
    ceiling = results["host_ceiling"]
    assert ceiling["tokens"] >= 5000  # --quick's ceiling_tokens
    _positive(ceiling, "tokenizer_tok_s", "job_k64_tok_s", "job_k1_tok_s", "job_k64_over_tokenizer")
    _positive(ceiling, "host_only_k64_tok_s", "host_only_k1_tok_s")
    startup = results["startup"]
    _positive(startup, "startup_s", "job_10_rows_wall_s")
    _finite(startup, "startup_beyond_imports_s", "job_10_rows_beyond_imports_s")
    assert startup["bare_imports_s"] >= 0  # imported already in this test's process
    storage = {row["encoding"]: row for row in results["storage"]}
    assert list(storage) == list(encodings.STORAGE_ENCODINGS)
    for row in storage.values():
        _positive(row, "bytes_per_position", "bytes_per_entry", "write_positions_s")
        _positive(row, "read_positions_s", "target_ratio", "entries_per_position")
        assert row["columns"]["footer"] > 0 and row["columns"]["logsumexp"] > 0
    assert storage["plain float32"]["max_error_nats"] == 0
    assert storage["compact"]["max_error_nats"] <= 1 / 104 + 8e-6  # float32 down to -64
    assert storage["plain float32"]["token_logprob_max_error_nats"] == 0
    assert 0 < storage["compact"]["token_logprob_max_error_nats"] <= 1 / 128 + 1e-6
    assert storage["compact top_p=0.95 min_k=2"]["entries_per_position"] < 64
    _check_teacher(results["teacher"])
    for heading in ("pipeline_efficiency", "steady_speedup", "e2e_speedup", "host_ceiling:"):
        assert heading in stdout, heading
    assert "bytes per position, by column:" in stdout


def test_naive_loop_writes_the_jobs_rows(tmp_path, model_dirs, texts):
    """The baseline does the job's work, the same rows and values, so the ratios are fair."""
    corpus = workloads.write_texts(tmp_path / "corpus.parquet", texts[:40])
    args = argparse.Namespace(k=5, max_length=32, max_tokens=4096, shard_rows=2000, dtype="auto")
    for family in ("t5", "gpt2"):
        naive_out, job_out = tmp_path / f"naive-{family}.parquet", tmp_path / f"job-{family}"
        baselines.naive_loop(model_dirs[family], corpus, str(naive_out), 5, 32, "cpu")
        runs.run_job_timed(runs.job_config(model_dirs[family], corpus, str(job_out), args))
        naive = pd.read_parquet(naive_out).sort_values(["id", "position"], ignore_index=True)
        job = pd.read_parquet(job_out).sort_values(["id", "position"], ignore_index=True)
        assert len(naive) == len(job) >= 40, family
        for column in ("id", "position", "token_id"):
            assert naive[column].equals(job[column].astype(naive[column].dtype)), (family, column)
        for column in ("logsumexp", "token_logprob"):
            np.testing.assert_allclose(naive[column], job[column], atol=2e-3, err_msg=column)
        np.testing.assert_allclose(
            np.stack(naive.topk_logits), np.stack(job.topk_logits), atol=2e-2, err_msg=family
        )
