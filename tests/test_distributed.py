"""Two CPU processes under `accelerate launch --multi_gpu` produce exactly the single-process rows
(compact, top_p output with teacher columns: the same shards byte for byte, id orders and
sampled ids included).

`--multi_gpu` starts the ranks through torchrun; with no GPU, PartialState(cpu=True) joins them
over gloo. (`--cpu` would start a single process unless MPI is installed.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from jobs import extract
from lib import sample
from lib.inspect.verify import verify
from tests.conftest import write_rows
from tests.launcher import accelerate_launch
from tests.test_teacher import single_tokens

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _read(out: Path):
    table = ds.dataset(out / "tokens", format="parquet").to_table()
    return table.sort_by([("id", "ascending"), ("position", "ascending")]).combine_chunks()


def test_two_processes_equal_one(model_dirs, tmp_path):
    texts = sample.generate_texts(45, seed=91, mean_words=8)
    targets = sample.generate_texts(45, seed=92, mean_words=4)
    texts[7], targets[30] = None, None  # skipped by whichever rank owns the unit
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    ids = [f"q{i}" for i in range(45)]
    write_rows(corpus / "a.parquet", texts[:20], targets[:20], ids[:20])
    write_rows(corpus / "b.parquet", texts[20:], targets[20:], ids[20:])
    settings = [
        f"model.path={model_dirs['t5']}",
        f"input.path={corpus}",
        "input.id_column=doc_id",
        "input.target_column=target",
        "decoder.mode=targets",
        "output.k=6",
        "output.shard_rows=7",
        "model.dtype=float32",
        "input.max_length=32",
        "output.level=both",
        # compact rows with top_p: every shard's footer (its id order) is the rank's own work
        "output.encoding=compact",
        "output.top_p=0.9",
        "output.min_k=2",
        "runtime.threads=1",  # as each of the two ranks gets
        # teacher columns: the draws depend on the row id and position, not on the rank
        "output.samples=3",
        "output.temperatures=[2.0]",
        f"output.probes={json.dumps(single_tokens(model_dirs['t5'], 2))}",
    ]

    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun gives each rank (OMP_NUM_THREADS=1)
    try:
        assert extract.main([*settings, f"output.dir={single}"]) == 0
    finally:
        torch.set_num_threads(threads)

    double = tmp_path / "double"
    code, stdout, stderr = accelerate_launch([*settings, f"output.dir={double}"])
    assert code == 0, stderr[-3000:]
    assert stdout.count("output rows") == 1  # only the main process prints the summary

    assert _read(double).equals(_read(single))  # every column, exactly
    for shard in (single / "tokens").iterdir():  # footers too: the same id order
        assert (double / "tokens" / shard.name).read_bytes() == shard.read_bytes()
    documents = ds.dataset(double / "documents").to_table().sort_by("id")
    assert documents.num_rows == 43
    assert documents.equals(ds.dataset(single / "documents").to_table().sort_by("id"))
    _same_manifest_but_ranks(double, single)


def _same_manifest_but_ranks(double, single) -> None:
    """The two-process manifest lists the single run's shards, rows, totals and scores."""
    manifest = json.loads((double / "_manifest.json").read_text())
    reference = json.loads((single / "_manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["scores"] == reference["scores"]  # merged in unit order, whoever wrote them
    # Ranks take every other unit (a token and a document shard each); both ranks' shards are
    # listed, with the rows of the single run.
    assert [s["rank"] for s in manifest["shards"]] == [
        i // 2 % 2 for i in range(len(manifest["shards"]))
    ]
    assert len(manifest["shards"]) == 14
    assert [(s["file"], s["rows"]) for s in manifest["shards"]] == [
        (s["file"], s["rows"]) for s in reference["shards"]
    ]
    assert manifest["totals"] == reference["totals"]
    assert manifest["totals"]["skipped_rows"] == 2
    skipped = pq.read_table(double / "_skipped/skipped.parquet").sort_by("id")
    assert skipped.equals(pq.read_table(single / "_skipped/skipped.parquet").sort_by("id"))
    assert verify(double, check_input=True).problems == []
