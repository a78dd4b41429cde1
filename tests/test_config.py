"""lib/config.py: YAML + typed `section.key=value` overrides, and validation that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib.config import JobConfig, coerce, describe_keys, load_config, parse_override
from lib.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(ROOT.glob("configs/*.yaml"))
BASE = ["model.path=m", "input.path=data.parquet", "output.dir=out"]


def error(overrides: list[str], path=None) -> str:
    """The message of the UserError that loading this config raises (always one line)."""
    with pytest.raises(UserError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"default.yaml", "t5-small.yaml", "causal-lm.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert config.model.path and config.input.path and config.output.dir
    assert config.to_dict().keys() == JobConfig().to_dict().keys()
    # The same config given as overrides on top of nothing resolves to the same values.
    overrides = [
        f"{s}.{k}={v}"
        for s, values in config.to_dict().items()
        for k, v in values.items()
        if v is not None and not isinstance(v, bool)
    ]
    overrides += [
        f"{s}.{k}={str(v).lower()}"
        for s, values in config.to_dict().items()
        for k, v in values.items()
        if isinstance(v, bool)
    ]
    assert load_config(None, overrides).to_dict() == config.to_dict()


def test_default_config_values():
    config = load_config(ROOT / "configs/default.yaml")
    assert config.decoder.mode == "targets"
    assert config.input.target_column == "target"
    assert config.input.prefix == "summarize: "
    assert config.model.trust_remote_code is False and config.model.allow_pickle is False


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("output.k=5", "output.k", 5),
        ("output.overwrite=true", "output.overwrite", True),
        ("output.overwrite=false", "output.overwrite", False),
        ("input.id_column=null", "input.id_column", None),
        ("input.id_column=~", "input.id_column", None),
        ("input.text_column=body", "input.text_column", "body"),
        ("input.prefix=", "input.prefix", ""),
        ("model.path=a=b", "model.path", "a=b"),
    ],
)
def test_parse_override_reads_values_as_yaml(text, key, value):
    parsed_key, parsed = parse_override(text)
    assert parsed_key == key
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    "text,attr,value",
    [
        ("output.k=7", ("output", "k"), 7),
        ("output.overwrite=true", ("output", "overwrite"), True),
        ("input.id_column=null", ("input", "id_column"), None),
        # String keys keep the text typed; YAML would read a bool, an int, or strip the space.
        ("input.prefix=yes", ("input", "prefix"), "yes"),
        ("input.text_column=2024", ("input", "text_column"), "2024"),
        ("input.prefix=summarize ", ("input", "prefix"), "summarize "),
        ("input.prefix=say: ", ("input", "prefix"), "say: "),
        ("input.prefix='quoted '", ("input", "prefix"), "quoted "),
    ],
)
def test_overrides_are_typed(text, attr, value):
    config = load_config(None, BASE + [text])
    got = getattr(getattr(config, attr[0]), attr[1])
    assert got == value and type(got) is type(value)


def test_coerce_accepts_int_for_float_but_not_bool_for_int():
    assert coerce("x.y", 3, float) == 3.0 and isinstance(coerce("x.y", 3, float), float)
    assert coerce("x.y", None, int | None) is None
    with pytest.raises(UserError, match="x.y: expected an integer, got true"):
        coerce("x.y", True, int)
    with pytest.raises(UserError, match="x.y: expected a number, got 'fast'"):
        coerce("x.y", "fast", float)
    with pytest.raises(UserError, match="x.y: expected a number, got '1e'"):
        coerce("x.y", "1e", float)


REQUIRED = ["model.path=m", "input.path=d", "output.dir=o"]


def test_exponent_floats_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-3 as a string; a float key takes it as the number it looks like."""
    assert coerce("x.y", "1e-3", float) == 0.001
    assert coerce("x.y", "-2E+2", float | None) == -200.0
    config = load_config(None, [*REQUIRED, "output.temperatures=[1e-30, 2e0]"])
    assert config.output.temperatures == [1e-30, 2.0]
    with pytest.raises(UserError, match="expected an integer, got '1e3'"):
        load_config(None, [*REQUIRED, "output.samples=1e3"])


def test_yaml_file_and_overrides_combine(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "model:\n  path: m\ninput:\n  path: d.parquet\n  id_column: null\n"
        "  target_column: ~\noutput:\n  dir: out\n  k: 3\ndecoder:\n"
    )
    config = load_config(path, ["output.k=9", "input.max_length=64"])
    assert (config.output.k, config.input.max_length) == (9, 64)
    assert config.input.id_column is None and config.input.target_column is None
    assert config.decoder.mode == "start"  # an empty section keeps its defaults


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "model.foo=1",
            "unknown config key 'model.foo'; model has path, dtype, trust_remote_code, "
            "allow_pickle, revision, local_files_only, cache_dir",
        ),
        (
            "output.kk=3",
            "unknown config key 'output.kk' (did you mean output.k?); output has dir, "
            "logits, k, top_p, min_k, encoding, dtype, format, shard_rows, rows, level, "
            "min_k_fraction, overwrite, report, probes, temperatures, samples, sample_temperature, seed",
        ),
        (
            "modle.path=x",
            "unknown config section 'modle' in 'modle.path' (did you mean model?); "
            "sections are model, input, decoder, batching, output, runtime",
        ),
        ("output.k=abc", "config key output.k: expected an integer, got 'abc'"),
        ("output.k=2.5", "config key output.k: expected an integer, got 2.5"),
        ("input.max_length=true", "config key input.max_length: expected an integer, got true"),
        (
            "output.overwrite=maybe",
            "config key output.overwrite: expected true or false, got 'maybe'",
        ),
        ("output.temperatures=x", "config key output.temperatures[0]: expected a number, got 'x'"),
        ("output.logits=some", "config key output.logits: expected one of topk, full, got 'some'"),
        (
            "decoder.mode=beam",
            "config key decoder.mode: expected one of start, targets, generate, got 'beam'",
        ),
        (
            "output.format=csv",
            "config key output.format: expected one of parquet, arrow, got 'csv'",
        ),
        ("output.k=0", "config key output.k: must be at least 1, got 0"),
        ("output.shard_rows=-5", "config key output.shard_rows: must be at least 1, got -5"),
        ("batching.max_tokens=4", "config key batching.max_tokens: must be at least 8, got 4"),
        (
            "decoder.mode=targets",
            "config key input.target_column is required when decoder.mode=targets",
        ),
        (
            "input.window_context=16",
            "config key input.window_context applies only with input.long_documents=windows "
            "(got truncate)",
        ),
        ("k=5", "override 'k=5' must look like section.key=value (did you mean output.k=5?)"),
        (
            "path=x",
            "override 'path=x' must look like section.key=value "
            "(did you mean model.path=x or input.path=x?)",
        ),
        ("output.k", "override 'output.k' must look like section.key=value, e.g. output.k=5"),
        (
            "configs/default.yaml",
            "argument 'configs/default.yaml' looks like a config file; "
            "pass it as --config configs/default.yaml",
        ),
    ],
)
def test_bad_override_messages(override, expected):
    assert error(BASE + [override]) == expected


@pytest.mark.parametrize(
    "key,expects",
    [
        ("model.path", "a checkpoint directory or a hub id"),
        ("input.path", "a Parquet file, a directory of them or a glob"),
        ("output.dir", "the directory to write the results to"),
    ],
)
def test_missing_required_key_says_what_it_expects(key, expects):
    given = [o for o in BASE if not o.startswith(key)]
    expected = f"config key {key} is required: {expects}; set it in the config file or as {key}=..."
    assert error(given) == expected
    assert error(given + [f"{key}="]) == expected  # an empty value is as good as none


def test_yaml_errors_name_file_line_and_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\n\tinput: 1\n")
    assert error([], bad) == (
        f"config file {bad} is not valid YAML: found character '\\t' that "
        "cannot start any token (line 3, column 1)"
    )
    unclosed = tmp_path / "unclosed.yaml"
    unclosed.write_text("model: [\n")
    assert error([], unclosed).startswith(f"config file {unclosed} is not valid YAML: ")
    assert "(line 2, column 1)" in error([], unclosed)


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "path: x\n",
            "unknown config section 'path'; sections are model, input, decoder, batching, output, runtime",
        ),
        (
            "- model\n",
            "expected a mapping of sections (model, input, decoder, batching, output, runtime), got list",
        ),
        ("model: gpt2\n", "section 'model' must be a mapping of keys, got 'gpt2'"),
        ("output:\n  dirr: x\n", "unknown config key 'output.dirr' (did you mean output.dir?)"),
    ],
)
def test_yaml_structure_errors(tmp_path, text, expected):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert expected in error(BASE, path)


def test_config_file_that_does_not_exist_or_is_a_directory(tmp_path):
    assert (
        error([], tmp_path / "nope.yaml") == f"config file {tmp_path / 'nope.yaml'} does not exist"
    )
    assert error([], tmp_path) == f"config file {tmp_path} is not a file"


def test_yaml_is_parsed_safely(tmp_path):
    """A python tag is refused, not run."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    assert "is not valid YAML" in error(BASE, path)
    assert not marker.exists()


def test_a_repeated_section_is_refused_not_replaced(tmp_path):
    """Plain YAML lets the second `output:` replace the first, so k: 5 silently became 20."""
    path = tmp_path / "job.yaml"
    path.write_text(
        "model:\n  path: m\noutput:\n  dir: out\n  k: 5\n"
        "input:\n  path: data.parquet\n\noutput:\n  k: 20\n"
    )
    assert error([], path) == f"config file {path}: key 'output' appears twice (lines 3 and 9)"


def test_a_repeated_nested_key_is_named_with_its_section(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("output:\n  dir: out\n  k: 5\n  overwrite: true\n  k: 20\n")
    assert error(BASE, path) == f"config file {path}: key 'output.k' appears twice (lines 3 and 5)"
    flow = tmp_path / "flow.yaml"
    flow.write_text("output: {k: 5, k: 20}\n")
    assert error(BASE, flow) == f"config file {flow}: key 'output.k' appears twice (line 1)"


def test_the_same_key_in_different_sections_and_anchors_still_load(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "model:\n  path: &where m\ninput:\n  path: data.parquet\n"
        "output:\n  dir: *where\n  k: 7\nruntime: {}\n"
    )
    config = load_config(path)
    assert (config.model.path, config.input.path) == ("m", "data.parquet")
    assert (config.output.dir, config.output.k) == ("m", 7)


def test_remote_code_and_pickle_are_off_by_default():
    config = load_config(None, BASE)
    assert config.model.trust_remote_code is False
    assert config.model.allow_pickle is False


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["output.top_p=0"], "config key output.top_p: must be above 0 and at most 1, got 0.0"),
        (["output.top_p=1.5"], "config key output.top_p: must be above 0 and at most 1, got 1.5"),
        (["output.min_k=0"], "config key output.min_k: must be at least 1, got 0"),
        (["output.min_k=30"], "config key output.min_k: 30 is more than output.k (20)"),
        (
            ["output.encoding=zip"],
            "config key output.encoding: expected one of plain, compact, got 'zip'",
        ),
        (
            ["output.top_p=0.9", "output.logits=full"],
            "config key output.top_p: 0.9 shapes top-k rows; output.logits=full has none",
        ),
        (
            ["output.encoding=compact", "output.level=documents"],
            "config key output.encoding: compact shapes token rows; output.level=documents has none",
        ),
        (
            ["output.encoding=compact", "output.format=arrow"],
            "config key output.encoding: compact needs output.format=parquet "
            "(its columns rely on Parquet's encodings)",
        ),
        (
            ["output.encoding=compact", "output.rows=examples"],
            "config key output.encoding: compact writes one row per position; "
            "use output.rows=positions or output.encoding=plain",
        ),
    ],
)
def test_top_p_and_encoding_are_checked(overrides, expected):
    assert error(BASE + overrides) == expected


def test_top_p_and_encoding_combinations_that_work():
    for extra in (
        ["output.top_p=0.95", "output.min_k=2", "output.rows=examples", "output.format=arrow"],
        ["output.encoding=compact", "output.top_p=0.95", "output.level=both"],
        ["output.min_k=3"],  # no effect without top_p, but not wrong
    ):
        load_config(None, BASE + extra)
    assert "output.encoding" in describe_keys() and "plain | compact" in describe_keys()


def test_help_names_the_devices_batch_budgets():
    from lib.extract import batching

    [line] = [line for line in describe_keys().splitlines() if "batching.max_tokens" in line]
    assert f"{batching.CPU_MAX_TOKENS} on a CPU" in line
    assert f"{batching.ACCELERATOR_MAX_TOKENS} on an accelerator" in line
