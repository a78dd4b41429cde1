"""The benchmark runs end to end (a smoke run: figures from it are not measurements)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from jobs import bench

pytestmark = pytest.mark.slow


def test_bench_quick_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # in this process: `make bench` runs the same main(), without a second torch import
        assert bench.main(["--quick", "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    rows = {row["model"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"t5-tiny", "gpt2-tiny"}
    for row in rows.values():
        for key in ("job_tok_s", "dense_tok_s", "naive_tok_s"):
            assert row[key] > 0, (row["model"], key)
        # Marginal figures of a smoke run are noise (even negative), but they must be computed.
        for key in (
            "efficiency",
            "steady_speedup",
            "pipeline_efficiency",
            "model_on_job_batches_tok_s",
            "job_marginal_tok_s",
        ):
            assert math.isfinite(row[key]), (row["model"], key)
        assert 0 < row["padding_efficiency"] <= 1
        assert 0 < row["input_checksum_share"] < 1 and row["complete_rerun_s"] > 0
    assert rows["t5-tiny"]["e2e_speedup"] > 0
    assert "efficiency" in stdout and "steady_speedup" in stdout
