"""Bad input and operator mistakes: one `error:` line naming the culprit, exit 2, no traceback.

A representative case of each stage runs through the command line (`python -m jobs.extract`) in
a process of its own, one of them a new interpreter (see IN_A_PROCESS); the rest call `main`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import extract
from lib.errors import UserError
from lib.extract.hub import load_error
from lib.extract.models import is_seq2seq_config
from tests.conftest import write_rows


# -- fixtures: broken checkpoints and inputs ---------------------------------------------------
def _copy(src: str, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True)
    for item in Path(src).iterdir():
        if item.is_file() and item.name not in skip:
            shutil.copy(item, dst / item.name)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """Checkpoints this job must refuse, each built from the session's tiny GPT-2 in a second."""
    # long: one short recipe per broken checkpoint, read best side by side
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("bad_models")
    gpt2 = model_dirs["gpt2"]
    models = {}
    # An encoder-only checkpoint: loading it "as causal" would give BertLMHeadModel a random head.
    models["bert"] = _copy(gpt2, root / "bert", skip=("config.json", "model.safetensors"))
    BertModel(
        BertConfig(
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(models["bert"])
    # Pickled weights only. transformers 5 always writes safetensors (safe_serialization=False is
    # ignored), so the state dict is pickled with torch.save, as older checkpoints were.
    models["pickle"] = _copy(gpt2, root / "pickle", skip=("model.safetensors",))
    torch.save(load_file(f"{gpt2}/model.safetensors"), models["pickle"] / "pytorch_model.bin")
    # A causal LM whose untied output projection is absent from the weights.
    models["headless"] = _copy(gpt2, root / "headless")
    _edit_config(models["headless"], tie_word_embeddings=False)
    models["no_tokenizer"] = _copy(
        gpt2, root / "no_tokenizer", skip=("tokenizer.json", "tokenizer_config.json")
    )
    models["no_config"] = _copy(gpt2, root / "no_config", skip=("config.json",))
    models["bad_json"] = _copy(gpt2, root / "bad_json")
    (models["bad_json"] / "config.json").write_text("{not json")
    models["corrupt_weights"] = _copy(gpt2, root / "corrupt_weights")
    (models["corrupt_weights"] / "model.safetensors").write_bytes(b"\x00" * 64)
    # Custom code: a configuration module that leaves a marker when it is executed.
    models["remote"] = _copy(gpt2, root / "remote", skip=("model.safetensors",))
    marker = root / "remote_code_ran"
    (models["remote"] / "configuration_sneaky.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\n"
        "class SneakyConfig(PretrainedConfig):\n    model_type = 'sneaky-lm'\n"
    )
    (models["remote"] / "config.json").write_text(
        json.dumps(
            {
                "model_type": "sneaky-lm",
                "architectures": ["SneakyForCausalLM"],
                "auto_map": {
                    "AutoConfig": "configuration_sneaky.SneakyConfig",
                    "AutoModelForCausalLM": "modeling_sneaky.SneakyForCausalLM",
                },
            }
        )
    )
    models["remote_marker"] = marker
    # Tokens added to the tokenizer without resizing the model: 305 tokens, 300 embedding rows.
    models["added_tokens"] = _copy(gpt2, root / "added_tokens")
    tokenizer = AutoTokenizer.from_pretrained(models["added_tokens"])
    tokenizer.add_tokens(["<new1>", "<new2>", "<new3>", "<new4>", "<new5>"])
    tokenizer.save_pretrained(models["added_tokens"])
    return models


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, model_dirs) -> Path:
    """A hub cache laid out as huggingface_hub leaves it: `org/complete` with the tiny GPT-2's
    files, `org/weightless` with its config and tokenizer but no weights (never downloaded)."""
    cache = tmp_path_factory.mktemp("hub_cache")
    for name, skip in (("complete", ()), ("weightless", ("model.safetensors",))):
        repo = cache / f"models--org--{name}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        _copy(model_dirs["gpt2"], repo / "snapshots" / commit, skip=skip)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    files = {
        "ok": write_rows(
            root / "ok.parquet",
            ["the cat sat", "a dog ran", "birds fly"],
            ["on the mat", "far away", "south"],
            ["a", "b", "c"],
        ),
        "dup": write_rows(root / "dup.parquet", ["one", "two", "three"], ids=["x", "y", "x"]),
        "not_parquet": root / "notes.parquet",
        "int_text": root / "int_text.parquet",
        "a_file": root / "a_file",
    }
    files["not_parquet"].write_text("this is a CSV, not Parquet\n1,2,3\n")
    pq.write_table(pa.table({"text": [1, 2, 3]}), files["int_text"])
    files["a_file"].write_text("a regular file")
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("model:\n  path: x\n\tinput: 1\n")
    files["bad_yaml"] = bad_yaml
    other = root / "other_files"
    other.mkdir()
    (other / "notes.txt").write_text("someone else's")
    files["other_files"] = other
    return {name: Path(p) for name, p in files.items()}


def base(model: str | Path, data_path: str | Path, out: Path) -> list[str]:
    return [f"model.path={model}", f"input.path={data_path}", f"output.dir={out}"]


def assert_no_output(out: Path) -> None:
    if out.exists():
        assert not (out / "_SUCCESS").exists()
        assert not list(out.glob("part-*"))


# -- through the command line, all started at once ---------------------------------------------
def _vocab(model_dir) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


# name -> f(models, bad_models, data, out) -> (argv, the exact stderr line)
CLI_CASES = {
    "unknown_key": lambda m, b, d, o: (
        [*base(m["gpt2"], d["ok"], o), "output.kk=3"],
        "error: unknown config key 'output.kk' (did you mean output.k?); output has dir, logits, "
        "k, top_p, min_k, encoding, dtype, format, shard_rows, rows, level, min_k_fraction, "
        "overwrite, report, probes, temperatures, samples, sample_temperature, seed",
    ),
    "wrong_type": lambda m, b, d, o: (
        [*base(m["gpt2"], d["ok"], o), "output.k=lots"],
        "error: config key output.k: expected an integer, got 'lots'",
    ),
    "missing_output_dir": lambda m, b, d, o: (
        base(m["gpt2"], d["ok"], o)[:2],
        "error: config key output.dir is required: the directory to write the results to; set it "
        "in the config file or as output.dir=...",
    ),
    "bad_yaml": lambda m, b, d, o: (
        ["--config", str(d["bad_yaml"])],
        f"error: config file {d['bad_yaml']} is not valid YAML: found character '\\t' that "
        "cannot start any token (line 3, column 1)",
    ),
    "hub_offline": lambda m, b, d, o: (
        base("nobody/no-such-model", d["ok"], o),
        "error: model.path nobody/no-such-model: no such local directory, and the hub id is not "
        "in the local cache; the hub was not asked because offline mode is on (HF_HUB_OFFLINE=1)",
    ),
    "encoder_only": lambda m, b, d, o: (
        base(b["bert"], d["ok"], o),
        f"error: model.path {b['bert']}: the checkpoint (model type 'bert', architecture "
        "BertModel) is neither a seq2seq LM nor a causal LM; this job needs one of the two",
    ),
    "pickle": lambda m, b, d, o: (
        base(b["pickle"], d["ok"], o),
        f"error: model.path {b['pickle']}: no safetensors weights; pickled weights can run code "
        "when loaded, so they need model.allow_pickle=true",
    ),
    "k_above_vocab": lambda m, b, d, o: (
        [*base(m["gpt2"], d["ok"], o), "output.k=100000"],
        f"error: config key output.k: 100000 is larger than the vocabulary ({_vocab(m['gpt2'])})",
    ),
    "missing_column": lambda m, b, d, o: (
        [*base(m["gpt2"], d["ok"], o), "input.text_column=body"],
        f"error: input.text_column: no column 'body' in {d['ok']}; its columns are text, target, "
        "doc_id",
    ),
    "not_parquet": lambda m, b, d, o: (
        base(m["gpt2"], d["not_parquet"], o),
        f"error: input file {d['not_parquet']} is not valid Parquet: Parquet magic bytes not found "
        "in footer. Either the file is corrupted or this is not a parquet file.",
    ),
    "output_other_files": lambda m, b, d, o: (
        base(m["gpt2"], d["ok"], d["other_files"]),
        f"error: output.dir {d['other_files']} is not empty and holds other files; use a new "
        "directory or output.overwrite=true",
    ),
    "output_under_a_file": lambda m, b, d, o: (
        base(m["gpt2"], d["ok"], d["a_file"] / "out"),
        f"error: output.dir {d['a_file'] / 'out'}: {d['a_file']} is a file, not a directory",
    ),
}


# Processes of their own for one mistake of each stage (config, model, input, output): the
# model's as a new interpreter (what transformers and torch print on import is seen), the others
# as children of the fork server; the rest run main() in this process.
IN_A_PROCESS = {"unknown_key", "hub_offline", "not_parquet", "output_under_a_file"}
NEW_INTERPRETER = {"hub_offline"}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, launcher, model_dirs, bad_models, data) -> dict:
    root = tmp_path_factory.mktemp("cli")
    running, results = {}, {}
    for name, case in CLI_CASES.items():
        argv, expected = case(model_dirs, bad_models, data, root / name)
        out = Path(argv[-1].partition("=")[2]) if name.startswith("output_") else root / name
        if name not in IN_A_PROCESS:  # the same main(), without paying a torch import each
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = extract.main([str(a) for a in argv])
            results[name] = (code, stdout.getvalue(), stderr.getvalue(), expected, out)
            continue
        run = launcher.start([str(a) for a in argv], real=name in NEW_INTERPRETER)
        running[name] = (run, expected, out)
    for name, (run, expected, out) in running.items():
        result = run.wait()
        results[name] = (result.code, result.stdout, result.stderr, expected, out)
    return results


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_error_is_one_line(cli_results, name):
    code, stdout, stderr, expected, out = cli_results[name]
    assert code == 2, stderr  # the request (tests/test_integrity.py: the disk's errors, exit 1)
    assert "Traceback" not in stderr
    assert stderr.splitlines() == [expected]
    assert stdout == ""
    assert_no_output(out)


def test_cli_other_files_are_left_alone(cli_results, data):
    assert sorted(p.name for p in data["other_files"].iterdir()) == ["notes.txt"]


def test_cli_model_errors_come_before_any_output(cli_results):
    """Model checks run before the output directory is even created."""
    for name in ("hub_offline", "encoder_only", "pickle", "k_above_vocab"):
        assert not cli_results[name][4].exists(), name


# -- in process --------------------------------------------------------------------------------
def fails(capsys, argv: list[str]) -> str:
    """Run the job, expect exit 2 and exactly one `error:` line on stderr; return that line."""
    code = extract.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_argparse_mistakes_are_one_line(capsys):
    assert fails(capsys, ["--bogus"]) == (
        "error: unrecognized arguments: --bogus (usage: python -m "
        "jobs.extract --config FILE [section.key=value ...])"
    )
    assert fails(capsys, ["--config"]).startswith("error: argument --config: expected one argument")


def test_config_file_mistakes(capsys, tmp_path):
    assert (
        fails(capsys, ["--config", tmp_path / "nope.yaml"])
        == f"error: config file {tmp_path / 'nope.yaml'} does not exist"
    )
    assert fails(capsys, ["configs/default.yaml"]) == (
        "error: argument 'configs/default.yaml' looks "
        "like a config file; pass it as --config "
        "configs/default.yaml"
    )
    assert (
        fails(capsys, ["model.path=x", "input.path=y", "output.dir=z", "k=5"])
        == "error: override 'k=5' must look like section.key=value (did you mean output.k=5?)"
    )


@pytest.mark.parametrize("drop", ["model.path", "input.path", "output.dir"])
def test_missing_required_key(capsys, tmp_path, drop):
    argv = [a for a in base("m", "d.parquet", tmp_path / "out") if not a.startswith(drop)]
    line = fails(capsys, argv)
    assert line.startswith(f"error: config key {drop} is required: ")


def test_bad_choice_names_the_choices(capsys, tmp_path, model_dirs, data):
    line = fails(capsys, [*base(model_dirs["t5"], data["ok"], tmp_path / "o"), "decoder.mode=beam"])
    assert (
        line
        == "error: config key decoder.mode: expected one of start, targets, generate, got 'beam'"
    )


@pytest.mark.parametrize(
    "model,expected",
    [
        ("no_config", "the directory has no config.json, so it is not a Hugging Face checkpoint"),
        (
            "bad_json",
            "cannot load the checkpoint in this directory: It looks like the config file at ",
        ),
        (
            "no_tokenizer",
            "no usable tokenizer (the one found has 1 token(s)); the checkpoint needs its "
            "tokenizer files, e.g. tokenizer.json",
        ),
        ("corrupt_weights", "cannot load the checkpoint in this directory: SafetensorError: "),
        (
            "headless",
            "the checkpoint lacks 1 weight(s) of GPT2LMHeadModel (e.g. lm_head.weight); they "
            "would be random, so the logits would mean nothing",
        ),
        (
            "remote",
            "the checkpoint needs its own Python code to load; set model.trust_remote_code=true "
            "only if you trust that code",
        ),
    ],
)
def test_checkpoints_that_cannot_be_used(capsys, tmp_path, bad_models, data, model, expected):
    out = tmp_path / "out"
    line = fails(capsys, base(bad_models[model], data["ok"], out))
    assert line.startswith(f"error: model.path {bad_models[model]}")
    assert expected in line
    assert not out.exists()  # refused before the output directory was touched


def test_a_tokenizer_larger_than_the_embeddings_is_refused_before_any_batch(
    capsys, tmp_path, bad_models
):
    """Token ids 300-304 would index past 300 embedding rows: an IndexError mid-run (on a GPU a
    device-side assert) if the job started."""
    rows = write_rows(tmp_path / "in.parquet", ["the cat sat <new3>", "a dog ran <new5>", "x"])
    out = tmp_path / "out"
    assert fails(capsys, base(bad_models["added_tokens"], rows, out)) == (
        f"error: model.path {bad_models['added_tokens']}: the tokenizer has 305 tokens but the "
        "model's input embeddings only 300 rows; token ids 300-304 would index past them "
        "(tokens added to the tokenizer without resizing the model?)"
    )
    assert not out.exists()  # no shard, not even the directory


@pytest.mark.parametrize("pickle", [[], ["model.allow_pickle=true"]], ids=["safe", "pickle"])
def test_a_cached_snapshot_without_weights_says_so(
    capsys, monkeypatch, tmp_path, hub_cache, data, pickle
):
    """Not "needs model.allow_pickle" (there is nothing to unpickle), nor "not in the local cache"
    (its config and tokenizer are)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = (
        hub_cache / "models--org--weightless/snapshots/0123456789abcdef0123456789abcdef01234567"
    )
    out = tmp_path / "out"
    argv = [*base("org/weightless", data["ok"], out), f"model.cache_dir={hub_cache}", *pickle]
    assert fails(capsys, argv) == (
        f"error: model.path org/weightless: the cached snapshot {snapshot} has no weights file "
        "(model.safetensors or pytorch_model.bin) and the hub was not asked (HF_HUB_OFFLINE=1); "
        "download the weights where there is a network (hf download org/weightless "
        f"--cache-dir {hub_cache}), then run again"
    )
    assert not out.exists()


def test_a_cached_snapshot_with_weights_loads_offline(monkeypatch, tmp_path, hub_cache, data):
    """The same cache with the weights: the job runs and records the snapshot's commit."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    argv = [*base("org/complete", data["ok"], out), f"model.cache_dir={hub_cache}"]
    assert extract.main(argv) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model"]["commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert len(pd.read_parquet(out / "tokens")) > 3


def test_missing_local_directory_and_file_paths(capsys, tmp_path, model_dirs, data):
    assert (
        fails(capsys, base(tmp_path / "nowhere", data["ok"], tmp_path / "o"))
        == f"error: model.path {tmp_path / 'nowhere'}: no such directory"
    )
    config_file = Path(model_dirs["gpt2"]) / "config.json"
    assert (
        fails(capsys, base(config_file, data["ok"], tmp_path / "o"))
        == f"error: model.path {config_file} is a file; expected a checkpoint directory or a hub id"
    )


def test_remote_code_runs_only_when_trusted(capsys, tmp_path, bad_models, data):
    marker = bad_models["remote_marker"]
    fails(capsys, base(bad_models["remote"], data["ok"], tmp_path / "a"))
    assert not marker.exists()
    # Trusted, the config code runs (the marker appears); the model code is absent, still one line.
    line = fails(
        capsys,
        [*base(bad_models["remote"], data["ok"], tmp_path / "b"), "model.trust_remote_code=true"],
    )
    assert marker.exists()
    assert line.startswith(f"error: model.path {bad_models['remote']}")


def test_pickled_weights_load_when_allowed(tmp_path, model_dirs, bad_models, data):
    """The same weights from pytorch_model.bin and from safetensors give identical rows."""
    common = ["output.dtype=float32", "model.dtype=float32", "input.id_column=doc_id"]
    assert (
        extract.main(
            [
                *base(bad_models["pickle"], data["ok"], tmp_path / "pickle"),
                "model.allow_pickle=true",
                *common,
            ]
        )
        == 0
    )
    assert extract.main([*base(model_dirs["gpt2"], data["ok"], tmp_path / "safe"), *common]) == 0
    pickled = pd.read_parquet(tmp_path / "pickle")
    safe = pd.read_parquet(tmp_path / "safe")
    assert len(safe) > 3
    pd.testing.assert_frame_equal(pickled, safe)


def test_load_error_messages_for_the_hub(monkeypatch):
    exc = OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nMore text")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert str(load_error("org/model", exc)) == (
        "model.path org/model: no such local directory, and the hub could not provide it: "
        "We couldn't connect to 'https://huggingface.co' to load the files."
    )
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert str(load_error("org/model", exc)).endswith(
        "the hub was not asked because offline mode is on (TRANSFORMERS_OFFLINE=1)"
    )
    assert str(load_error("./models/t5", exc)) == "model.path ./models/t5: no such directory"


def test_task_kind_from_config():
    from transformers import BertConfig, GPT2Config, T5Config, ViTConfig

    assert is_seq2seq_config(T5Config(architectures=["T5ForConditionalGeneration"])) is True
    assert (
        is_seq2seq_config(T5Config(architectures=["T5WithLMHeadModel"])) is True
    )  # legacy t5-small name
    assert is_seq2seq_config(GPT2Config()) is False
    assert (
        is_seq2seq_config(BertConfig(architectures=["BertLMHeadModel"], is_decoder=True)) is False
    )
    cases = [
        (BertConfig(architectures=["BertForMaskedLM"]), "architecture BertForMaskedLM) is neither"),
        (
            BertConfig(architectures=["BertLMHeadModel"]),
            "is an encoder that attends in both directions (is_decoder is false)",
        ),
        (ViTConfig(), "(model type 'vit') is neither a seq2seq LM nor a causal LM"),
    ]
    for config, expected in cases:
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            is_seq2seq_config(config)


@pytest.mark.parametrize(
    "key,path_key,expected",
    [
        (
            "input.path",
            "glob",
            "error: input.path {d}/nothing*.parquet: no file matches this pattern",
        ),
        (
            "input.path",
            "missing",
            "error: input.path {d}/missing.parquet: no such file or directory",
        ),
        (
            "input.id_column=doc",
            "ok",
            "error: input.id_column: no column 'doc' in {d}/ok.parquet; its "
            "columns are text, target, doc_id",
        ),
        (
            "input.target_column=summary",
            "ok",
            "error: input.target_column: no column 'summary' in "
            "{d}/ok.parquet; its columns are text, target, doc_id",
        ),
        (
            "",
            "int_text",
            "error: input.text_column: column 'text' in {d}/int_text.parquet has type "
            "int64; expected strings",
        ),
        (
            "input.id_column=doc_id",
            "dup",
            "error: input.id_column: id 'x' occurs 2 times (in "
            "dup.parquet); ids in column 'doc_id' must be unique",
        ),
    ],
)
def test_input_errors(capsys, tmp_path, model_dirs, data, key, path_key, expected):
    folder = data["ok"].parent
    paths = {**data, "glob": folder / "nothing*.parquet", "missing": folder / "missing.parquet"}
    out = tmp_path / "out"
    argv = base(model_dirs["gpt2"], paths[path_key], out) + ([key] if "=" in key else [])
    assert fails(capsys, argv) == expected.format(d=folder)
    assert not out.exists()  # input errors come before the model and the output


def test_output_dir_of_another_job_needs_overwrite(capsys, tmp_path, model_dirs, data):
    out = tmp_path / "out"
    assert extract.main(base(model_dirs["gpt2"], data["ok"], out)) == 0
    capsys.readouterr()
    line = fails(capsys, base(model_dirs["t5"], data["ok"], out))
    assert line == (
        f"error: output.dir {out} was started with other settings (model.path: "
        f'"{model_dirs["gpt2"]}", now "{model_dirs["t5"]}"); use a new directory, the same '
        "settings, or output.overwrite=true"
    )
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model"]["model_type"] == "gpt2"  # the refused run changed nothing
    assert extract.main([*base(model_dirs["t5"], data["ok"], out), "output.overwrite=true"]) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model"]["model_type"] == "t5"
    assert (out / "_SUCCESS").exists()
