"""The output as the clients users already have read it, and straight into a distillation loop.

DuckDB, Polars, Hugging Face `datasets`, pandas and pyarrow each get one plain call on the output
folder and must return exactly the job's token rows; `output.rows=examples` must hold the same
numbers as the positions layout, one row per input, and train a student through a DataLoader.
"""

from __future__ import annotations

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from jobs import extract
from lib import results, sample
from tests.conftest import write_rows

ROWS = 36
KEYS = [("id", "ascending"), ("position", "ascending")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dirs) -> dict:
    """One causal job over the same corpus in three layouts: positions (Parquet, and Arrow in
    float32), and examples (Arrow)."""
    root = tmp_path_factory.mktemp("clients")
    texts = sample.generate_texts(ROWS, seed=41, mean_words=9)
    corpus = write_rows(root / "corpus.parquet", texts)
    base = [
        f"model.path={model_dirs['gpt2']}",
        f"input.path={corpus}",
        "output.k=6",
        "output.shard_rows=10",
        "input.max_length=20",
    ]
    layouts = {
        "positions": [],
        "arrow32": ["output.format=arrow", "output.dtype=float32"],
        "examples": ["output.format=arrow", "output.rows=examples"],
        "examples-parquet": ["output.rows=examples"],
    }
    runs = {"texts": texts, "root": root}
    for name, extra in layouts.items():
        out = root / name
        assert extract.main([*base, f"output.dir={out}", *extra]) == 0
        runs[name] = out
    runs["rows"] = results.load_table(runs["positions"]).sort_by(KEYS)
    # Seq2seq, full logits: examples are built batch by batch there, not per shard.
    targets = sample.generate_texts(ROWS, seed=42, mean_words=5)
    seq2seq = write_rows(root / "pairs.parquet", texts, targets)
    t5 = [
        f"model.path={model_dirs['t5']}",
        f"input.path={seq2seq}",
        "input.target_column=target",
        "decoder.mode=targets",
        "output.logits=full",
        "output.format=arrow",
        "output.shard_rows=10",
        "input.max_length=20",
    ]
    for name, extra in (("t5-full", []), ("t5-full-examples", ["output.rows=examples"])):
        assert extract.main([*t5, f"output.dir={root / name}", *extra]) == 0
        runs[name] = root / name
    runs["targets"] = targets
    return runs


def _same_rows(table: pa.Table, expected: pa.Table) -> None:
    table = table.sort_by(KEYS).combine_chunks()
    assert table.num_rows == expected.num_rows
    assert table.cast(expected.schema).equals(expected)


def test_pandas_and_pyarrow_read_the_folder(runs):
    _same_rows(
        pa.Table.from_pandas(pd.read_parquet(runs["positions"]), preserve_index=False), runs["rows"]
    )
    _same_rows(ds.dataset(runs["positions"], format="parquet").to_table(), runs["rows"])


def test_duckdb_reads_the_token_shards(runs):
    out = runs["positions"]
    table = duckdb.sql(f"SELECT * FROM '{out}/tokens/*.parquet'").to_arrow_table()
    _same_rows(table, runs["rows"])
    # Arrow output in float32 through pyarrow (DuckDB has no float16 for Arrow input).
    tokens = ds.dataset(runs["arrow32"] / "tokens", format="arrow")  # noqa: F841 (read by name)
    [(mean,)] = duckdb.sql("SELECT avg(token_logprob) FROM tokens").fetchall()
    expected = pd.Series(runs["rows"].column("token_logprob").to_pylist(), dtype="float64")
    assert mean == pytest.approx(expected.mean(), rel=1e-6)


def test_polars_reads_the_token_shards(runs):
    out = runs["positions"]
    _same_rows(pl.scan_parquet(f"{out}/tokens/*.parquet").collect().to_arrow(), runs["rows"])
    _same_rows(pl.read_parquet(out / "tokens").to_arrow(), runs["rows"])
    arrow32 = results.load_table(runs["arrow32"]).sort_by(KEYS)
    _same_rows(pl.scan_ipc(f"{runs['arrow32']}/tokens/*.arrow").collect().to_arrow(), arrow32)


def test_hf_datasets_reads_the_token_shards(runs, tmp_path):
    import datasets

    data = datasets.load_dataset(
        "parquet",
        data_dir=str(runs["positions"] / "tokens"),
        split="train",
        cache_dir=str(tmp_path),
    )
    _same_rows(data.data.table, runs["rows"])
    arrow = datasets.load_dataset(
        "arrow", data_dir=str(runs["arrow32"] / "tokens"), split="train", cache_dir=str(tmp_path)
    )
    _same_rows(arrow.data.table, results.load_table(runs["arrow32"]).sort_by(KEYS))


@pytest.mark.parametrize("name", ["examples", "examples-parquet"])
def test_examples_hold_the_positions_rows_and_the_whole_input(runs, model_dirs, name):
    table = results.load_table(runs[name])
    assert table.num_rows == ROWS and table.column("id").to_pylist() == list(range(ROWS))
    _same_rows(results.positions_table(table), runs["rows"])
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["gpt2"])
    expected = tokenizer(runs["texts"], truncation=True, max_length=20)["input_ids"]
    assert table.column("input_ids").to_pylist() == expected
    # The readers that work per position see the same rows in either layout.
    a, b = results.load_arrays(runs[name]), results.load_arrays(runs["positions"])
    order_a = sorted(range(len(a["id"])), key=lambda i: (a["id"][i], a["position"][i]))
    order_b = sorted(range(len(b["id"])), key=lambda i: (b["id"][i], b["position"][i]))
    assert (a["topk_logits"][order_a] == b["topk_logits"][order_b]).all()


def test_seq2seq_full_logit_examples(runs, model_dirs):
    table = results.load_table(runs["t5-full-examples"]).sort_by("id")
    expected = results.load_table(runs["t5-full"]).sort_by(KEYS).combine_chunks()
    _same_rows(results.positions_table(table), expected)
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["t5"])
    encoder = tokenizer(runs["texts"], truncation=True, max_length=20)["input_ids"]
    targets = tokenizer(text_target=runs["targets"], truncation=True, max_length=20)["input_ids"]
    assert table.column("input_ids").to_pylist() == encoder
    start = 0  # T5's decoder_start_token_id (the pad token)
    assert table.column("decoder_input_ids").to_pylist() == [[start] + t[:-1] for t in targets]
    assert table.column("token_id").to_pylist() == targets


def test_distillation_loop_over_to_hf_dataset(runs, tmp_path):
    """The README's loop, verbatim in spirit: a DataLoader, a padding collate, the top-k KL."""
    data = results.to_hf_dataset(runs["examples"])
    assert len(data) == ROWS and data[0]["input_ids"].dtype == torch.int64

    def collate(rows: list[dict]) -> dict:
        def pad(values, fill):
            return pad_sequence(values, batch_first=True, padding_value=fill)

        return {
            "input_ids": pad([r["input_ids"] for r in rows], 0),
            "mask": pad([torch.ones(len(r["input_ids"])) for r in rows], 0),
            "topk_ids": pad([r["topk_ids"] for r in rows], 0),
            "topk_logprobs": pad(
                [r["topk_logits"].float() - r["logsumexp"][:, None] for r in rows], 0.0
            ),
        }

    torch.manual_seed(0)
    student = GPT2LMHeadModel(
        GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    )
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(data, batch_size=12, shuffle=True, collate_fn=collate)
    losses = []
    for _ in range(6):
        for batch in loader:
            logits = student(batch["input_ids"], attention_mask=batch["mask"]).logits
            student_lp = logits.log_softmax(-1).gather(-1, batch["topk_ids"])
            teacher_lp = batch["topk_logprobs"]
            kl = (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1)
            loss = (kl * batch["mask"]).sum() / batch["mask"].sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses


@pytest.mark.parametrize(
    "model,settings",
    [
        ("t5", ["decoder.mode=generate", "decoder.max_new_tokens=5"]),
        ("t5", ["decoder.mode=start"]),
        ("gpt2", ["input.target_column=target"]),  # a continuation: positions start mid-sequence
    ],
    ids=["generate", "start", "continuation"],
)
def test_examples_in_every_task(runs, model_dirs, model, settings):
    base = [
        f"model.path={model_dirs[model]}",
        f"input.path={runs['root'] / 'pairs.parquet'}",
        "output.k=4",
        "input.max_length=20",
        *settings,
    ]
    name = "-".join(s.split("=")[1] for s in settings[:1])
    outs = {}
    for rows in ("positions", "examples"):
        outs[rows] = runs["root"] / f"{model}-{name}-{rows}"
        assert extract.main([*base, f"output.dir={outs[rows]}", f"output.rows={rows}"]) == 0
    expected = results.load_table(outs["positions"]).sort_by(KEYS).combine_chunks()
    table = results.load_table(outs["examples"]).sort_by("id")
    _same_rows(results.positions_table(table), expected)
    if "decoder_input_ids" in table.column_names:  # the start token, then the tokens but the last
        for decoder, tokens in zip(
            table.column("decoder_input_ids").to_pylist(),
            table.column("token_id").to_pylist(),
            strict=True,
        ):
            assert decoder == [0] + [t if t is not None else 0 for t in tokens[:-1]]


def test_the_output_root_reads_as_the_token_rows(runs):
    """With the report drawn, one plain call on OUT itself returns the token rows: every entry
    at OUT but the data folder starts with `_`, and nothing at OUT ends in .parquet, so a glob
    OUT/*.parquet finds no file (an error) instead of an empty one (0 rows, silently)."""
    from lib.inspect import report

    out = runs["positions"]
    report.write_report(out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("_")) == ["tokens"]
    expected = runs["rows"]
    _same_rows(pa.Table.from_pandas(pd.read_parquet(out), preserve_index=False), expected)
    _same_rows(ds.dataset(out, format="parquet").to_table(), expected)
    with pytest.raises(duckdb.IOException, match="No files found"):
        duckdb.sql(f"SELECT count(*) FROM '{out}/*.parquet'").fetchall()
    rows = duckdb.sql(f"SELECT count(*) FROM '{out}/tokens/*.parquet'").fetchall()[0][0]
    assert rows == len(expected)


def test_an_output_of_the_earlier_layout_still_reads_and_a_rerun_moves_it(
    runs, model_dirs, tmp_path
):
    """report.html and _skipped.parquet at OUT, as outputs were written before: verify, the
    report and the readers take it as it is; the next run of the job (or of the report) moves
    both, and OUT reads as the token rows again."""
    import shutil

    from lib import results
    from lib.inspect import report
    from lib.inspect.verify import verify

    old = tmp_path / "old"
    shutil.copytree(runs["positions"], old)
    report.write_report(old)
    (old / "_report.html").rename(old / "report.html")
    (old / "_skipped" / "skipped.parquet").rename(old / "_skipped.parquet")
    (old / "_skipped").rmdir()
    assert verify(old, check_input=True).problems == []
    assert results.load_table(old).num_rows == len(runs["rows"])
    manifest = results.read_manifest(old)
    config = manifest["config"]
    argv = [
        f"model.path={model_dirs['gpt2']}",
        f"input.path={config['input']['path']}",
        f"output.dir={old}",
        f"output.k={config['output']['k']}",
        f"output.shard_rows={config['output']['shard_rows']}",
        f"input.max_length={config['input']['max_length']}",
    ]
    assert extract.main(argv) == 0
    assert not (old / "report.html").exists() and not (old / "_skipped.parquet").exists()
    assert (old / "_skipped" / "skipped.parquet").is_file()
    assert verify(old, check_input=True).problems == []
    _same_rows(ds.dataset(old, format="parquet").to_table(), runs["rows"])
