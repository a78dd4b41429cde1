"""lib/extract/stages.py and lib/output/units.py: the stages one by one, then joined (lib.job)."""

from __future__ import annotations

import dataclasses
import threading
import types

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lib import faults, job
from lib.config import load_config
from lib.errors import OutputError, UserError
from lib.extract import batching, corpus, stages
from lib.output import layout, units
from tests.conftest import write_rows


@pytest.fixture(scope="module")
def planned(tmp_path_factory, model_dirs, texts):
    """A 41-row corpus (one null text) in units of 12, planned as the job plans it."""
    root = tmp_path_factory.mktemp("stages")
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
    plan = job.plan(config, root / "out", torch.device("cpu"))
    yield config, plan
    corpus.close(plan.inputs)


def loaded(config, plan) -> list[stages.Loaded]:
    read = stages.read(plan.units, config.input, plan.lm, plan.task, examples=False)
    return list(stages.batches(read, plan.lm, 96, 0))


class Bar:
    def update(self, n):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass


def forward(config, plan) -> stages.Forward:
    return stages.Forward(plan.lm, plan.task, plan.reduce, max_tokens=96, max_new_tokens=8)


def committer() -> units.Committer:
    return units.Committer("f", 0, "r", lambda: None)


def test_batches_give_each_units_batches_then_its_end(planned):
    config, plan = planned
    items = loaded(config, plan)
    ends = [item.unit.work.index for item in items if item.batch is None]
    assert ends == [u.index for u in plan.units]
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


def test_forward_counts_each_units_tokens(planned):
    config, plan = planned
    items = [item for item in loaded(config, plan) if item.unit.work.index < 2]
    computed = list(forward(config, plan)(items, stages.Progress(Bar(), 24)))
    ends = [c for c in computed if c.reduced is None]
    assert len(ends) == 2
    for end in ends:
        batches = [i.batch for i in items if i.unit is end.unit and i.batch is not None]
        assert end.tokens == sum(b.real_tokens for b in batches)
        assert end.padded_tokens == sum(b.padded_tokens for b in batches)
        assert [b.rows for b in end.batches] == [len(b.requests) for b in batches]


def test_extract_commits_one_shard_per_unit(planned, tmp_path):
    config, plan = planned
    config = dataclasses.replace(
        config, output=dataclasses.replace(config.output, dir=str(tmp_path))
    )
    for folder in (layout.TOKENS, layout.UNITS):
        (tmp_path / folder).mkdir()
    job.extract(config, plan, plan.units, committer(), progress=False)
    shards = layout.shard_files(tmp_path)
    assert [p.name for p in shards] == [f"{u.name}.parquet" for u in plan.units]
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in shards) > 0
    assert layout.temporaries(tmp_path) == []


def test_a_writer_failure_stops_every_stage(planned, tmp_path, monkeypatch):
    config, plan = planned
    config = dataclasses.replace(
        config, output=dataclasses.replace(config.output, dir=str(tmp_path))
    )
    for folder in (layout.TOKENS, layout.UNITS):
        (tmp_path / folder).mkdir()
    faults.reset()
    monkeypatch.setenv("LOGIT_EXTRACT_FAIL_AT", "shard_close:2")
    with pytest.raises(OutputError, match="No space left on device"):
        job.extract(config, plan, plan.units, committer(), progress=False)
    assert [p.name for p in layout.shard_files(tmp_path)] == ["part-00000.parquet"]
    assert layout.temporaries(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name in ("loader", "writer")]


def test_the_ready_event_follows_every_device_copy(planned, tmp_path, monkeypatch):
    """On a GPU the writer reads the pinned buffers once `ready` has passed, so the event must
    come after the last device-to-host copy (the token ids are on the device in every task)."""
    config, plan = planned
    order = []

    class Event:  # stands in for torch.cuda.Event
        def __init__(self, blocking=False):
            pass

        def record(self):
            order.append("ready")

        def synchronize(self):
            order.append("waited")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(stages, "to_host", lambda value: order.append("copy") or value)
    monkeypatch.setattr(batching.Batch, "to", lambda batch, device: batch)
    # the CPU model, said to be on a GPU: what is tested is the order of copies and event
    gpu_lm = dataclasses.replace(plan.lm, device=types.SimpleNamespace(type="cuda"))
    gpu = stages.Forward(gpu_lm, plan.task, plan.reduce, max_tokens=96, max_new_tokens=8)
    first = loaded(config, plan)[0]
    with torch.inference_mode():
        reduced, _ = gpu.reduce(first.batch)
    assert order[-1] == "ready" and order.count("copy") == len(reduced.stats) + 3
    # what the unit keeps until it commits is copied out of the (pinned) buffers, after the wait
    state = units.UnitState(first.unit)
    write = units.UnitWriter(
        tmp_path, plan.outputs, committer(), fmt="parquet", k=3, min_k_fraction=0.2
    )
    write.add(state, reduced)
    assert order[-1] == "waited"
    kept = state.parts[0]
    for name, value in reduced.stats.items():
        assert not np.shares_memory(kept[name], value.numpy()), name
        np.testing.assert_array_equal(kept[name], value.numpy())


def test_commit_workers_from_the_cores_or_the_environment(monkeypatch):
    monkeypatch.delenv("LOGIT_EXTRACT_COMMIT_WORKERS")
    for cores, workers in ((None, 1), (1, 1), (2, 1), (6, 3), (64, 4)):
        monkeypatch.setattr(units.os, "cpu_count", lambda cores=cores: cores)
        assert units.commit_workers() == workers, cores
    monkeypatch.setenv("LOGIT_EXTRACT_COMMIT_WORKERS", " 6 ")
    assert units.commit_workers() == 6
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("LOGIT_EXTRACT_COMMIT_WORKERS", bad)
        with pytest.raises(UserError, match=f"LOGIT_EXTRACT_COMMIT_WORKERS='{bad}'"):
            units.commit_workers()
