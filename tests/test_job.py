"""lib/job.py: the whole job in this process."""

from __future__ import annotations

import datetime
import logging

import torch

from lib import job
from lib.config import load_config
from lib.extract import batching
from tests.conftest import write_rows


def _config(model: str, corpus: str, out, *overrides: str):
    return load_config(
        None, [f"model.path={model}", f"input.path={corpus}", f"output.dir={out}", *overrides]
    )


def test_a_null_batch_budget_is_the_devices_default(tmp_path, model_dirs):
    corpus = write_rows(tmp_path / "c.parquet", ["one text", "another text"])
    config = _config(model_dirs["gpt2"], corpus, tmp_path / "out", "batching.max_tokens=null")
    manifest = job.run_job(config, progress=False).manifest
    # the budget the run used is recorded; the caller's config keeps its null
    assert manifest.config.batching.max_tokens == batching.CPU_MAX_TOKENS == 4096
    assert config.batching.max_tokens is None
    assert batching.max_tokens_for(None, torch.device("cuda")) == 16384
    assert batching.max_tokens_for(96, torch.device("cpu")) == 96


def test_ranks_wait_for_each_other_longer_than_the_backends_default(
    tmp_path, model_dirs, monkeypatch
):
    """NCCL would end a rank's wait after 10 minutes (gloo after 30): too short for rank 0's
    input hashing or a resume that leaves every unit to one rank."""
    import accelerate

    asked = {}

    def partial_state(**kwargs):
        asked.update(kwargs)
        return real(**kwargs)

    real = accelerate.PartialState
    monkeypatch.setattr(accelerate, "PartialState", partial_state)
    corpus = write_rows(tmp_path / "c.parquet", ["one text", "another text"])
    job.run_job(_config(model_dirs["gpt2"], corpus, tmp_path / "out"), progress=False)
    assert asked["timeout"] >= datetime.timedelta(days=1)


def test_the_callers_torch_threads_come_back(tmp_path, model_dirs):
    corpus = write_rows(tmp_path / "c.parquet", ["one text"])
    before = torch.get_num_threads()
    config = _config(model_dirs["gpt2"], corpus, tmp_path / "out", "runtime.threads=1")
    job.run_job(config, progress=False)
    assert torch.get_num_threads() == before


def test_a_bad_commit_workers_setting_stops_before_any_work(monkeypatch, tmp_path, model_dirs):
    from jobs import extract

    monkeypatch.setenv("LOGIT_EXTRACT_COMMIT_WORKERS", "auto")
    corpus = write_rows(tmp_path / "c.parquet", ["one text", "another text"])
    out = tmp_path / "out"
    argv = [f"model.path={model_dirs['gpt2']}", f"input.path={corpus}", f"output.dir={out}"]
    assert extract.main(argv) == 2
    assert not out.exists()


def test_verbose_logs_the_plan(tmp_path, model_dirs, caplog):
    from jobs import extract

    corpus = write_rows(tmp_path / "c.parquet", ["one text", "another text", "a third"])
    argv = [f"model.path={model_dirs['gpt2']}", f"input.path={corpus}", f"output.dir={tmp_path}/o"]
    with caplog.at_level(logging.INFO, logger="lib.job"):
        assert extract.main([*argv, "output.shard_rows=2"]) == 0
    assert (
        f"plan: input files 1, rows 3, units 2; model {model_dirs['gpt2']} (GPT2LMHeadModel, "
        "float32 on cpu); task causal"
    ) in caplog.messages
