"""lib.pipeline: the stages one by one, and the whole job in this process."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lib import faults, pipeline
from lib.config import load_config
from lib.errors import OutputError, UserError
from lib.extract import batching, corpus, models
from lib.output import layout, writer
from tests.conftest import write_rows


@pytest.fixture(scope="module")
def job(tmp_path_factory, model_dirs, texts):
    root = tmp_path_factory.mktemp("pipeline")
    data = write_rows(root / "in.parquet", texts[:40] + [None], ids=[f"r{i}" for i in range(41)])
    config = load_config(
        None,
        [
            f"model.path={model_dirs['gpt2']}",
            f"input.path={data}",
            "input.id_column=doc_id",
            f"output.dir={root / 'out'}",
            "output.shard_rows=12",
            "output.k=3",
            "batching.max_tokens=96",
        ],
    )
    lm = models.load_model(config.model, torch.device("cpu"))
    units = corpus.plan_units(corpus.inspect_inputs(config.input), 12)
    return config, lm, units


def _extraction(config, lm, units, out_dir) -> pipeline.Extraction:
    schema = writer.output_schema(
        pa.string(), config.output.k, lm.vocab_size, "float16", full=False
    )
    plan = pipeline.Plan(
        task="causal",
        schema=schema,
        shard_schema=schema,
        documents_schema=None,
        out_dir=out_dir,
        rank=0,
        run_id="r",
        fingerprint="f",
        check_lease=lambda: None,
    )
    return pipeline.Extraction(config, lm, plan, units, progress=False)


def test_load_gives_each_units_batches_then_its_end(job, tmp_path):
    config, lm, units = job
    items = list(_extraction(config, lm, units, tmp_path).load())
    ends = [item.unit.work.index for item in items if item.batch is None]
    assert ends == [u.index for u in units]
    rows = {}
    for item in items:
        if item.batch is not None:
            for request in item.batch.requests:
                rows.setdefault(item.unit.work.index, []).append(request.row)
            assert item.batch.padded_tokens <= 96 or len(item.batch.requests) == 1
    assert {i: sorted(r) for i, r in rows.items()} == {
        0: list(range(12)),
        1: list(range(12)),
        2: list(range(12)),
        3: [0, 1, 2, 3],
    }
    assert items[-1].unit.skipped == [(4, "null_text")]


def test_compute_counts_each_units_tokens(job, tmp_path):
    config, lm, units = job
    extraction = _extraction(config, lm, units[:2], tmp_path)

    class Bar:
        def update(self, n):
            pass

        def set_postfix_str(self, *args, **kwargs):
            pass

    loaded = list(extraction.load())
    computed = list(extraction.compute(loaded, Bar()))
    ends = [c for c in computed if c.reduced is None]
    for end in ends:
        batches = [i.batch for i in loaded if i.unit is end.unit and i.batch is not None]
        assert end.tokens == sum(b.real_tokens for b in batches)
        assert end.padded_tokens == sum(b.padded_tokens for b in batches)


def test_run_commits_one_shard_per_unit(job, tmp_path):
    config, lm, units = job
    for folder in (layout.TOKENS, layout.UNITS):
        (tmp_path / folder).mkdir()
    _extraction(config, lm, units, tmp_path).run()
    shards = layout.shard_files(tmp_path)
    assert [p.name for p in shards] == [f"{u.name}.parquet" for u in units]
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in shards) > 0
    assert layout.temporaries(tmp_path) == []


def test_a_writer_failure_stops_every_stage(job, tmp_path, monkeypatch):
    config, lm, units = job
    for folder in (layout.TOKENS, layout.UNITS):
        (tmp_path / folder).mkdir()
    faults.reset()
    monkeypatch.setenv("LOGIT_EXTRACT_FAIL_AT", "shard_close:2")
    with pytest.raises(OutputError, match="No space left on device"):
        _extraction(config, lm, units, tmp_path).run()
    assert [p.name for p in layout.shard_files(tmp_path)] == ["part-00000.parquet"]
    assert layout.temporaries(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name in ("loader", "writer")]


def test_a_null_batch_budget_is_the_devices_default(job, tmp_path):
    config, _, _ = job
    config = load_config(
        None,
        [
            f"model.path={config.model.path}",
            f"input.path={config.input.path}",
            "input.id_column=doc_id",
            f"output.dir={tmp_path / 'out'}",
            "output.k=3",
            "batching.max_tokens=null",
        ],
    )
    manifest = pipeline.run_job(config, progress=False)
    # the budget the run used is recorded; the caller's config keeps its null
    assert manifest["config"]["batching"]["max_tokens"] == batching.CPU_MAX_TOKENS == 4096
    assert config.batching.max_tokens is None
    assert batching.max_tokens_for(None, torch.device("cuda")) == 16384
    assert batching.max_tokens_for(96, torch.device("cpu")) == 96
    # an Extraction built from the config directly (library use) takes the same default
    _, lm, units = job
    items = list(_extraction(config, lm, units, tmp_path / "direct").load())
    assert sum(item.batch is None for item in items) == len(units)


def test_the_ready_event_follows_every_device_copy(job, tmp_path, monkeypatch):
    """On a GPU the writer reads the pinned buffers once `ready` has passed, so the event must
    come after the last device-to-host copy (the token ids are on the device in every task)."""
    config, lm, units = job
    order = []

    class Event:  # stands in for torch.cuda.Event
        def __init__(self, blocking=False):
            pass

        def record(self):
            order.append("ready")

        def synchronize(self):
            order.append("waited")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(pipeline, "_to_host", lambda value: order.append("copy") or value)
    monkeypatch.setattr(batching.Batch, "to", lambda batch, device: batch)
    # the CPU model, said to be on a GPU: what is tested is the order of copies and event
    gpu_lm = dataclasses.replace(lm, device=types.SimpleNamespace(type="cuda"))
    extraction = _extraction(config, gpu_lm, units, tmp_path)
    loaded = next(iter(_extraction(config, lm, units, tmp_path).load()))
    with torch.inference_mode():
        reduced, _ = extraction._reduce(loaded.batch)
    assert order[-1] == "ready" and order.count("copy") == len(reduced.stats) + 3
    # what the unit keeps until it commits is copied out of the (pinned) buffers, after the wait
    state = pipeline.UnitShard(loaded.unit)
    extraction._add(state, reduced)
    assert order[-1] == "waited"
    kept = state.parts[0]
    for name, value in reduced.stats.items():
        assert not np.shares_memory(kept[name], value.numpy()), name
        np.testing.assert_array_equal(kept[name], value.numpy())


def test_ranks_wait_for_each_other_longer_than_the_backends_default(job, tmp_path, monkeypatch):
    """NCCL would end a rank's wait after 10 minutes (gloo after 30): too short for rank 0's
    input hashing or a resume that leaves every unit to one rank."""
    import accelerate

    asked = {}

    def partial_state(**kwargs):
        asked.update(kwargs)
        return real(**kwargs)

    real = accelerate.PartialState
    monkeypatch.setattr(accelerate, "PartialState", partial_state)
    config, _, _ = job
    config = dataclasses.replace(
        config, output=dataclasses.replace(config.output, dir=str(tmp_path / "out"))
    )
    pipeline.run_job(config, progress=False)
    assert asked["timeout"] >= datetime.timedelta(days=1)


def test_commit_workers_from_the_cores_or_the_environment(monkeypatch):
    monkeypatch.delenv("LOGIT_EXTRACT_COMMIT_WORKERS")
    for cores, workers in ((None, 1), (1, 1), (2, 1), (6, 3), (64, 4)):
        monkeypatch.setattr(pipeline.os, "cpu_count", lambda cores=cores: cores)
        assert pipeline.commit_workers() == workers, cores
    monkeypatch.setenv("LOGIT_EXTRACT_COMMIT_WORKERS", " 6 ")
    assert pipeline.commit_workers() == 6
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("LOGIT_EXTRACT_COMMIT_WORKERS", bad)
        with pytest.raises(UserError, match=f"LOGIT_EXTRACT_COMMIT_WORKERS='{bad}'"):
            pipeline.commit_workers()


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
    with caplog.at_level(logging.INFO, logger="lib.pipeline"):
        assert extract.main([*argv, "output.shard_rows=2"]) == 0
    assert (
        f"plan: input files 1, rows 3, units 2; model {model_dirs['gpt2']} (GPT2LMHeadModel, "
        "float32 on cpu); task causal"
    ) in caplog.messages
