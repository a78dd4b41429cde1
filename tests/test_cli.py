"""End to end through the real command line: `python -m jobs.extract --config FILE ...`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoTokenizer

from jobs import extract
from lib import sample
from lib.config import JobConfig, load_config
from tests.reference import read_corpus

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "configs" / "default.yaml"
COLUMNS = [
    "id",
    "position",
    "token_id",
    "token_logprob",
    "token_rank",
    "logsumexp",
    "entropy",
    "topk_ids",
    "topk_logits",
]
MANIFEST_KEYS = {
    "fingerprint",
    "config",
    "model",
    "schema",
    "format",
    "world_size",
    "shards",
    "totals",
    "throughput",
}


def contract_schema(id_type: pa.DataType, k: int, value_type: pa.DataType) -> pa.Schema:
    """The token row schema, written out independently of lib/output/rows.py."""
    return pa.schema(
        [
            pa.field("id", id_type, nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("token_id", pa.int32()),
            pa.field("token_logprob", pa.float32()),
            pa.field("token_rank", pa.int32()),
            pa.field("logsumexp", pa.float32(), nullable=False),
            pa.field("entropy", pa.float32(), nullable=False),
            pa.field("topk_ids", pa.list_(pa.int32(), k), nullable=False),
            pa.field("topk_logits", pa.list_(value_type, k), nullable=False),
        ]
    )


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def summary_fields(stdout: str) -> dict[str, str]:
    """The summary's `  label   value` lines as {label: value}."""
    fields = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"  (\S.*?)\s{2,}(\S.*)", line)
        if match:
            fields[match.group(1)] = match.group(2)
    return fields


def check_output_dir(out: Path, stdout: str) -> tuple[pd.DataFrame, dict]:
    """What every finished run guarantees: the files, the manifest, the summary and the schema."""
    assert (out / "_SUCCESS").is_file()
    assert not [p for p in out.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert MANIFEST_KEYS <= manifest.keys()
    shards = manifest["shards"]
    assert sorted(f"tokens/{p.name}" for p in (out / "tokens").iterdir()) == sorted(
        s["file"] for s in shards
    )
    for shard in shards:
        assert set(shard) == {"file", "rows", "bytes", "sha256", "rank"} and shard["rank"] == 0
        assert pq.ParquetFile(out / shard["file"]).metadata.num_rows == shard["rows"]
        assert (out / shard["file"]).stat().st_size == shard["bytes"]
    totals = manifest["totals"]
    assert totals["input_rows"] == totals["scored_rows"] + totals["skipped_rows"]
    assert totals["output_rows"] == sum(s["rows"] for s in shards)
    assert pq.read_table(out / "_skipped/skipped.parquet").num_rows == totals["skipped_rows"]

    fields = summary_fields(stdout)
    run = manifest["throughput"]
    assert fields["rows"] == (
        f"{totals['input_rows']:,} input = {totals['scored_rows']:,} scored + "
        f"{totals['skipped_rows']:,} skipped ({totals['truncated_rows']:,} truncated)"
    )
    plural = "" if len(shards) == 1 else "s"
    assert fields["output rows"] == f"{totals['output_rows']:,} in {len(shards)} shard{plural}"
    assert fields["tokens"] == f"{run['tokens']:,} ({run['padded_tokens']:,} padded)"
    assert 0 < run["tokens"] <= run["padded_tokens"]
    assert re.fullmatch(r"\d{1,3}\.\d%", fields["padding efficiency"])
    assert 0 < run["padding_efficiency"] <= 1
    assert re.fullmatch(r"[\d,]+ tokens/s, [\d,]+\.\d rows/s", fields["throughput"])
    assert run["tokens_per_s"] > 0 and run["rows_per_s"] > 0
    assert re.fullmatch(r"\d+\.\d s", fields["wall time"]) and run["wall_s"] > 0
    assert fields["output"] == str(out)

    frame = pd.read_parquet(out)
    assert list(frame.columns) == COLUMNS
    assert len(frame) == totals["output_rows"]
    return frame, manifest


def check_dtypes(frame: pd.DataFrame, k: int) -> None:
    """pandas dtypes of the contract when no token is null (targets mode), and the list elements."""
    assert pd.api.types.is_string_dtype(frame["id"])
    got = {name: str(frame[name].dtype) for name in COLUMNS[1:6]}
    assert got == {
        "position": "int32",
        "token_id": "int32",
        "token_logprob": "float32",
        "token_rank": "int32",
        "logsumexp": "float32",
    }
    first = frame.iloc[0]
    assert first["topk_ids"].dtype == "int32" and first["topk_ids"].shape == (k,)
    assert first["topk_logits"].dtype == "float16" and first["topk_logits"].shape == (k,)


def test_default_config_on_the_fixtures(tmp_path, model_dirs, corpus):
    """configs/default.yaml as shipped (T5, `targets`, top-20, float16), only paths overridden."""
    out = tmp_path / "out"
    result = run_cli(
        "jobs.extract",
        "--config",
        "configs/default.yaml",
        f"model.path={model_dirs['t5']}",
        f"input.path={corpus}",
        f"output.dir={out}",
    )
    frame, manifest = check_output_dir(out, result.stdout)
    config = yaml.safe_load(DEFAULT.read_text())
    k, prefix, max_length = (
        config["output"]["k"],
        config["input"]["prefix"],
        config["input"]["max_length"],
    )
    assert (
        config["decoder"]["mode"] == "targets"
        and manifest["config"]["decoder"]["mode"] == "targets"
    )
    check_dtypes(frame, k)
    for shard in manifest["shards"]:
        assert pq.read_schema(out / shard["file"]).remove_metadata() == contract_schema(
            pa.string(), k, pa.float16()
        )

    # The counts follow from the tokenizer alone: one row per target token, every input row scored.
    rows = read_corpus(corpus)
    tok = AutoTokenizer.from_pretrained(model_dirs["t5"])
    targets = [
        tok(text_target=t, truncation=True, max_length=max_length)["input_ids"]
        for t in rows["target"]
    ]
    truncated = sum(len(tok(prefix + t)["input_ids"]) > max_length for t in rows["text"])
    truncated += sum(len(tok(text_target=t)["input_ids"]) > max_length for t in rows["target"])
    assert truncated >= 1  # the corpus has a text far beyond max_length
    assert manifest["totals"] == {
        "input_rows": len(rows),
        "scored_rows": len(rows),
        "skipped_rows": 0,
        "truncated_rows": truncated,
        "output_rows": sum(map(len, targets)),
        "topk_entries": sum(map(len, targets)) * k,
    }
    # One shard per input file: each holds fewer than output.shard_rows rows.
    assert len(manifest["shards"]) == 2
    assert set(frame["id"]) == set(rows["doc_id"])
    assert not frame.duplicated(["id", "position"]).any()
    want_tokens = {
        (i, p): token
        for i, tgt in zip(rows["doc_id"], targets, strict=True)
        for p, token in enumerate(tgt)
    }
    assert (
        dict(zip(zip(frame["id"], frame["position"], strict=True), frame["token_id"], strict=True))
        == want_tokens
    )
    _values_are_consistent(out, frame, manifest, rows)


def _values_are_consistent(out, frame: pd.DataFrame, manifest: dict, rows) -> None:
    """Descending top-k, logsumexp above the best logit, a shard's rows in input order."""
    topk = pd.DataFrame(frame["topk_logits"].tolist()).to_numpy("float32")
    assert (topk[:, :-1] >= topk[:, 1:]).all()
    assert (frame["logsumexp"].to_numpy() >= topk[:, 0] - 1e-2).all()
    assert (frame["token_logprob"] <= 0).all() and (frame["token_rank"] >= 0).all()
    # In top-k mode a shard's rows are in input order.
    first = pd.read_parquet(out / manifest["shards"][0]["file"])
    order = {doc_id: i for i, doc_id in enumerate(rows["doc_id"])}
    keys = list(zip(first["id"].map(order), first["position"], strict=True))
    assert keys == sorted(keys)


def test_make_sample_then_default_config(tmp_path, launcher):
    """What `make extract` does: build the offline sample, then run the default config on it
    (as fork-server children: test_default_config_on_the_fixtures runs a new interpreter)."""
    root = tmp_path / "sample"
    result = launcher.start([str(root)], module="jobs.make_sample").wait()
    result.assert_ok()
    info = json.loads((root / "sample.json").read_text())
    assert info.pop("version") == sample.default.VERSION
    assert result.stdout.strip() == (
        f"sample corpus {info['corpus']}, model {info['model']}, "
        f"causal model {info['causal_model']}"
    )
    # The sample has the layout that configs/default.yaml expects under data/sample/.
    config = yaml.safe_load(DEFAULT.read_text())
    assert Path(info["model"]) == root / Path(config["model"]["path"]).relative_to("data/sample")
    assert Path(info["corpus"]) == root / Path(config["input"]["path"]).relative_to("data/sample")
    assert (Path(info["model"]) / "model.safetensors").is_file()
    assert (Path(info["causal_model"]) / "model.safetensors").is_file()
    table = pq.read_table(info["corpus"])
    for key in ("text_column", "id_column", "target_column"):
        assert config["input"][key] in table.column_names, key

    # Built once: a second call reuses what exists.
    stamps = {
        p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != "sample.json"
    }
    assert sample.build_default_sample(root) == info
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # The default config on the first 60 rows of the generated corpus (all 2,000 take ~30 s).
    head = tmp_path / "head.parquet"
    pq.write_table(table.slice(0, 60), head)
    out = tmp_path / "out"
    result = launcher.start(
        [
            "--config",
            "configs/default.yaml",
            f"model.path={info['model']}",
            f"input.path={head}",
            f"output.dir={out}",
        ]
    ).wait()
    result.assert_ok()
    frame, manifest = check_output_dir(out, result.stdout)
    check_dtypes(frame, config["output"]["k"])
    assert manifest["totals"]["input_rows"] == manifest["totals"]["scored_rows"] == 60
    assert set(frame["id"]) == set(table.column("doc_id").to_pylist()[:60])
    assert manifest["model"]["vocab_size"] >= manifest["model"]["tokenizer_size"]
    assert max(frame["topk_ids"].map(max)) < manifest["model"]["vocab_size"]
    # The trained sample T5 on docstrings it never saw: far from chance (perplexity 2,000,
    # top-1 1/2,000), so a first run shows numbers that look like a model.
    scores = manifest["scores"]
    assert scores["perplexity"] <= manifest["model"]["vocab_size"] / 8
    assert scores["top1_accuracy"] >= 0.15
    assert scores["perplexity"] == pytest.approx(np.exp(-frame["token_logprob"].mean()))
    # The output directory reads as one table with a generic reader.
    assert len(pd.read_parquet(out)) == len(frame)


def test_help_lists_every_key_and_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        extract.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for section, keys in JobConfig().to_dict().items():
        for key in keys:
            assert f"  {section}.{key} " in text, key
    assert "output.level               tokens (tokens | documents | both)" in text

    argv = ["--config", str(DEFAULT), "output.k=7", "runtime.threads=1", "--print-config"]
    assert extract.main(argv) == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    again = load_config(tmp_path / "resolved.yaml")
    assert again == load_config(DEFAULT, ["output.k=7", "runtime.threads=1"])
    assert again.output.k == 7 and again.runtime.threads == 1


def test_runtime_threads_sets_torchs_threads_for_the_job_only(monkeypatch):
    from lib import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cores = len(os.sched_getaffinity(0))
    assert runtime.threads(None) == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.threads(None) == 1


def test_a_resume_with_changed_local_weights_is_refused(
    tmp_path, model_dirs, corpus, texts, capsys
):
    """The same model.path, other weights (re-saved with another seed): the output that was
    started with the old ones is refused in one line naming the changed file."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dirs["gpt2"], model)
    argv = [
        f"model.path={model}",
        f"input.path={corpus}",
        f"output.dir={tmp_path / 'out'}",
        "input.max_length=16",
    ]
    assert extract.main(argv) == 0
    # the fixture's tokenizer and shapes, other random weights
    sample.build_causal(tmp_path / "other", texts, "gpt2", d_model=32, vocab_size=300, seed=9)
    shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
    capsys.readouterr()
    assert extract.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert "the model's files changed since this output was started" in line
    assert "model.safetensors differs" in line and "\n" not in line


def test_every_package_is_installed():
    """pyproject lists packages by name: a new subpackage left out works in the editable
    install of `make` and the tests, and is missing from a wheel (`pip install .`)."""
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = sorted(
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("lib", "jobs")
        for init in (ROOT / top).rglob("__init__.py")
    )
    assert sorted(listed) == found


def test_one_command_lists_its_subcommands_and_maps_errors_to_exit_statuses(capsys, tmp_path):
    """`logit-extract --help` names every command; an unknown one, a bad argument, a path that
    is not an output and a file that cannot be read are one line each with their statuses."""
    from lib import cli

    assert cli.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for name in ("extract", "verify", "report", "export", "bench", "sample"):
        assert f"\n  {name} " in help_text
    assert cli.main([]) == 2
    assert cli.main(["frob"]) == 2
    assert capsys.readouterr().err.endswith(
        "error: unknown command 'frob'; commands are extract, verify, report, export, bench, sample\n"
    )
    assert cli.main(["verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the following arguments are required: out_dir (usage: ")
    assert len(err.splitlines()) == 1
    assert cli.main(["verify", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'} does not exist\n"
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not an output directory" in capsys.readouterr().err


def test_the_console_script_is_installed():
    """pyproject's [project.scripts]: `make` installs `logit-extract` into the venv."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "logit-extract"
    found = str(script) if script.exists() else shutil.which("logit-extract")
    assert found, "logit-extract is not installed (pip install -e .)"
    result = subprocess.run([found, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: logit-extract COMMAND" in result.stdout


def test_make_extract_runs_n_processes_through_accelerate():
    """`make extract NPROC=2` launches the job with the venv's accelerate, two processes."""

    def dry_run(*args: str) -> str:
        # Under `make test` the variables of the outer make would print its directory lines.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        dry = subprocess.run(
            ["make", "--no-print-directory", "-n", "extract", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert dry.returncode == 0, dry.stderr
        return dry.stdout.strip().splitlines()[-1]

    assert dry_run("NPROC=2") == (
        ".venv/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
        "--mixed_precision no --dynamo_backend no -m jobs.extract --config configs/default.yaml"
    )
    assert dry_run() == ".venv/bin/python -m jobs.extract --config configs/default.yaml"
