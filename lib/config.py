"""Job configuration: dataclasses, YAML loading, `section.key=value` overrides, validation."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lib.errors import UserError

_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

REQUIRED = "???"  # placeholder for keys that have no default
MAX_SAMPLES = 1024  # output.samples: sparse-logit distillation uses tens


@dataclass
class ModelConfig:
    path: str = REQUIRED
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    revision: str | None = None  # a hub branch, tag or commit; the commit loaded is recorded
    local_files_only: bool = False  # never ask the hub: the local cache or directory only
    cache_dir: str | None = None  # the hub cache (default: HF_HOME's)


@dataclass
class InputConfig:
    path: str = REQUIRED
    text_column: str | None = "text"  # null with messages_column
    id_column: str | None = None
    target_column: str | None = None
    prefix: str = ""
    max_length: int = 512
    long_documents: str = "truncate"  # or windows: every token scored, in rolling windows
    window_context: int | None = None  # tokens of context a window carries; null: max_length // 2
    # A column of conversations (lists of {role, content}, or JSON text of one), scored through
    # the tokenizer's chat template instead of text_column; causal models only.
    messages_column: str | None = None
    chat_template: str | None = (
        None  # a Jinja template, or a file holding one; null: the tokenizer's
    )
    score_roles: list[str] | None = (
        None  # with messages: rows only where these roles' tokens are predicted
    )


@dataclass
class DecoderConfig:
    mode: str = "start"
    max_new_tokens: int = 64


@dataclass
class BatchingConfig:
    # padded tokens per batch; null: 4096 on a CPU, where smaller batches stay in cache, and
    # 16384 on an accelerator (lib.extract.batching.max_tokens_for)
    max_tokens: int | None = None


@dataclass
class OutputConfig:
    dir: str = REQUIRED
    logits: str = "topk"
    k: int = 20
    top_p: float = 1.0  # keep each position's shortest top-k prefix holding this mass; 1: all k
    min_k: int = 1  # with top_p: keep at least this many entries
    encoding: str = "plain"  # plain: today's columns; compact: quantized, frequency-coded top-k
    dtype: str = "float16"
    format: str = "parquet"
    shard_rows: int = 5000
    rows: str = "positions"  # one output row per scored position, or one per input row
    level: str = "tokens"  # token rows, one row per document, or both
    min_k_fraction: float = 0.2  # Min-K% Prob and Min-K%++: the share of lowest tokens averaged
    overwrite: bool = False
    report: bool = True  # write OUT/_report.html at the end of the extract command
    probes: list[str] = field(default_factory=list)  # one-token strings: probe_logprobs
    temperatures: list[float] = field(default_factory=list)  # logsumexp_t, one per temperature
    samples: int = 0  # sample_ids and sample_logprobs: ids drawn from the teacher per position
    sample_temperature: float = 1.0  # the temperature the samples are drawn at
    seed: int = 0  # the draws depend only on this, the row id and the position


@dataclass
class RuntimeConfig:
    # torch's intra-op threads; null: the cores this process may use, split between the ranks
    # on this host (on a loaded 2-core machine OMP_NUM_THREADS=1 ran 3.5x faster than 2)
    threads: int | None = None


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The resolved config as plain data, for the manifest and the fingerprint."""
        return dataclasses.asdict(self)


CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "input.long_documents": ("truncate", "windows"),
    "decoder.mode": ("start", "targets", "generate"),
    "output.logits": ("topk", "full"),
    "output.dtype": ("float16", "float32"),
    "output.format": ("parquet", "arrow"),
    "output.rows": ("positions", "examples"),
    "output.level": ("tokens", "documents", "both"),
    "output.encoding": ("plain", "compact"),
}
POSITIVE = (
    "input.max_length",
    "input.window_context",
    "decoder.max_new_tokens",
    "output.k",
    "output.shard_rows",
    "output.min_k",
    "runtime.threads",
)
# What each required key expects, so the message for a missing one says what to give.
REQUIRED_HELP = {
    "model.path": "a checkpoint directory or a hub id",
    "input.path": "a Parquet file, a directory of them or a glob",
    "output.dir": "the directory to write the results to",
}
_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
}


def describe_keys() -> str:
    """Every `section.key` with its default and choices, for `--help`."""
    lines = []
    for section in dataclasses.fields(JobConfig):
        for item in dataclasses.fields(section.default_factory()):
            key = f"{section.name}.{item.name}"
            default = item.default
            if default is dataclasses.MISSING:
                default = item.default_factory()
            if default == REQUIRED:
                default = "required"
            elif not isinstance(default, str) or not default:
                default = _show(default) if not isinstance(default, list) else "[]"
            choices = f" ({' | '.join(CHOICES[key])})" if key in CHOICES else ""
            if key == "batching.max_tokens":
                choices = " (the device's: 4096 on a CPU, 16384 on an accelerator)"
            lines.append(f"  {key:<26} {default}{choices}")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML: null, true, 'text', 3."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]
    return repr(value)


def _options(tp: Any) -> tuple:
    return (
        typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    )


def coerce(key: str, value: Any, tp: Any) -> Any:
    """`value` checked against a config field's type `tp` (ints are taken where floats are);
    a UserError naming `key` otherwise."""
    for option in _options(tp):
        if option is type(None) and value is None:
            return None
        if typing.get_origin(option) is list and value is not None:
            (item,) = typing.get_args(option)
            values = value if isinstance(value, list) else [value]  # `x=assistant`: one item
            return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(values)]
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if option is str and isinstance(value, str):
            return value
    hint = " (quote it: YAML reads yes, no, on and off as booleans)" if tp is str else ""
    raise UserError(f"config key {key}: expected {_type_name(tp)}, got {_show(value)}{hint}")


def _suggest(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(JobConfig)]


def _set(config: JobConfig, key: str, value: Any, raw: str | None = None) -> None:
    """Set one `section.key`; `raw` is the override's text, kept as is for string keys."""
    section_name, _, name = key.partition(".")
    sections = _section_names()
    if section_name not in sections:
        raise UserError(
            f"unknown config section {section_name!r} in {key!r}"
            f"{_suggest(section_name, sections)}; sections are {', '.join(sections)}"
        )
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise UserError(
            f"unknown config key {key!r}{_suggest(name, list(hints), section_name + '.')}; "
            f"{section_name} has {', '.join(hints)}"
        )
    tp = hints[name]
    if raw is not None and value is not None and list[str] in _options(tp):
        # Items stay the text typed too: `output.probes=[yes, no]` is two strings, not booleans.
        value = yaml.load(raw, Loader=yaml.BaseLoader)
    elif raw is not None and value is not None and str in _options(tp):
        # A string key keeps the text typed on the command line: `input.prefix=yes` is "yes",
        # not true, and `input.prefix=say: ` keeps its space; quotes ('say: ') are YAML's.
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        value = value if quoted and isinstance(value, str) else raw
    setattr(section, name, coerce(key, value, tp))


def _flatten(data: Any, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"{where}: expected a mapping of sections ({', '.join(_section_names())}), "
            f"got {type(data).__name__}"
        )
    flat = {}
    for section, values in data.items():
        if section not in _section_names():
            names = _section_names()
            raise UserError(
                f"{where}: unknown config section {section!r}{_suggest(str(section), names)}; "
                f"sections are {', '.join(names)}"
            )
        if values is None:  # `output:` with nothing under it
            continue
        if not isinstance(values, dict):
            raise UserError(
                f"{where}: section {section!r} must be a mapping of keys, got {_show(values)}"
            )
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def _bare_key_hint(key: str, raw: str) -> str:
    """For `k=5`: ' (did you mean output.k=5?)', naming every section that has such a key."""
    owners = [
        s for s in _section_names() if key in typing.get_type_hints(type(getattr(JobConfig(), s)))
    ]
    return f" (did you mean {' or '.join(f'{s}.{key}={raw}' for s in owners)}?)" if owners else ""


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is read as YAML, so `k=5` is an int, `x=null` None."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        if not sep and text.endswith((".yaml", ".yml")):
            raise UserError(
                f"argument {text!r} looks like a config file; pass it as --config {text}"
            )
        hint = (_bare_key_hint(key.strip(), raw) if sep else "") or ", e.g. output.k=5"
        raise UserError(f"override {text!r} must look like section.key=value{hint}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # A bare word that YAML reads as a date or similar stays the string the user typed; a list
    # ([" yes", " no"]) is a list.
    if not isinstance(value, bool | int | float | str | type(None) | list):
        value = raw
    return key.strip(), value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`problem (line L, column C)` from a YAML error, on one line."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return (
        f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
        if mark is not None
        else problem
    )


class _RepeatedKey(yaml.YAMLError):
    """A key repeated in one YAML mapping, which plain YAML loading lets replace the first."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a repeated key at any mapping level (_RepeatedKey)."""

    def construct_document(self, node: yaml.Node) -> Any:
        """Check the whole document's node tree for repeated keys, then construct it safely."""
        _refuse_repeated_keys(node, "", set())
        return super().construct_document(node)


def _refuse_repeated_keys(node: yaml.Node, where: str, seen: set[int]) -> None:
    # An alias shares its node with the anchor: visit each node once (aliases may be recursive).
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_repeated_keys(item, f"{where}[{index}]", seen)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            name = f"{where}.{key_node.value}" if where else key_node.value
            line = key_node.start_mark.line + 1
            key = (key_node.tag, key_node.value)
            if key in lines:
                at = f"lines {lines[key]} and {line}" if lines[key] != line else f"line {line}"
                raise _RepeatedKey(f"key {name!r} appears twice ({at})")
            lines[key] = line
            _refuse_repeated_keys(value_node, name, seen)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Load a YAML config, apply `section.key=value` overrides, and validate the result."""
    config = JobConfig()
    explicit = set()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise UserError(f"config file {path} does not exist")
        if not path.is_file():
            raise UserError(f"config file {path} is not a file")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except _RepeatedKey as exc:
            raise UserError(f"config file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {path} cannot be read: {exc}") from None
        for key, value in _flatten(data, f"config file {path}").items():
            _set(config, key, value)
            explicit.add(key)
    for text in overrides:
        key, value = parse_override(text)
        _set(config, key, value, raw=text.partition("=")[2])
        explicit.add(key.strip())
    if config.input.messages_column is not None and "input.text_column" not in explicit:
        config.input.text_column = None  # a conversation is the text; the default column is not
    validate(config)
    return config


def from_record(data: dict) -> JobConfig | None:
    """The config a job recorded (`config.to_dict()` in its `_job.json`), unvalidated; None when
    it does not load (a record of another version)."""
    config = JobConfig()
    try:
        for key, value in _flatten(data, "recorded config").items():
            _set(config, key, value)
    except UserError:
        return None
    return config


def validate(config: JobConfig) -> None:
    """Reject missing required keys, unknown choices and out-of-range numbers, naming the key."""
    data = config.to_dict()
    for section, values in data.items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if key in REQUIRED_HELP and (value == REQUIRED or not str(value).strip()):
                raise UserError(
                    f"config key {key} is required: {REQUIRED_HELP[key]}; "
                    f"set it in the config file or as {key}=..."
                )
            if key in CHOICES and value not in CHOICES[key]:
                expected = ", ".join(CHOICES[key])
                raise UserError(f"config key {key}: expected one of {expected}, got {_show(value)}")
            if key in POSITIVE and value is not None and value < 1:
                raise UserError(f"config key {key}: must be at least 1, got {value}")
    if config.batching.max_tokens is not None and config.batching.max_tokens < 8:
        raise UserError(
            f"config key batching.max_tokens: must be at least 8, got {config.batching.max_tokens}"
        )
    context = config.input.window_context
    if context is not None and config.input.long_documents != "windows":
        raise UserError(
            "config key input.window_context applies only with input.long_documents=windows "
            f"(got {config.input.long_documents})"
        )
    if context is not None and context > config.input.max_length:
        raise UserError(
            f"config key input.window_context: {context} is more than input.max_length "
            f"({config.input.max_length}); a window is at most max_length positions"
        )
    if not 0 < config.output.min_k_fraction <= 1:
        raise UserError(
            "config key output.min_k_fraction: must be above 0 and at most 1, "
            f"got {config.output.min_k_fraction}"
        )
    _validate_topk_storage(config.output)
    _validate_messages(config.input)
    _validate_teacher_columns(config.output)
    if config.decoder.mode == "targets" and not config.input.target_column:
        raise UserError("config key input.target_column is required when decoder.mode=targets")


def _validate_topk_storage(output: OutputConfig) -> None:
    """output.top_p, output.min_k and output.encoding shape the top-k of token rows."""
    if not 0 < output.top_p <= 1:
        raise UserError(
            f"config key output.top_p: must be above 0 and at most 1, got {output.top_p}"
        )
    if output.min_k > output.k:
        raise UserError(
            f"config key output.min_k: {output.min_k} is more than output.k ({output.k})"
        )
    for key, value, active in (
        ("output.top_p", output.top_p, output.top_p < 1),
        ("output.encoding", output.encoding, output.encoding == "compact"),
    ):
        if not active:
            continue
        if output.logits == "full":
            raise UserError(
                f"config key {key}: {value} shapes top-k rows; output.logits=full has none"
            )
        if output.level == "documents":
            raise UserError(
                f"config key {key}: {value} shapes token rows; output.level=documents has none"
            )
    if output.encoding == "compact" and output.format != "parquet":
        raise UserError(
            "config key output.encoding: compact needs output.format=parquet "
            "(its columns rely on Parquet's encodings)"
        )
    if output.encoding == "compact" and output.rows == "examples":
        raise UserError(
            "config key output.encoding: compact writes one row per position; "
            "use output.rows=positions or output.encoding=plain"
        )


def _validate_messages(cfg: InputConfig) -> None:
    """input.messages_column replaces the text column; the chat keys need it."""
    if cfg.messages_column is None:
        if cfg.text_column is None:
            raise UserError(
                "config key input.text_column is required: the column of texts to score "
                "(or input.messages_column for conversations)"
            )
        for key, value in (("score_roles", cfg.score_roles), ("chat_template", cfg.chat_template)):
            if value is not None:
                raise UserError(
                    f"config key input.{key} applies to conversations; set input.messages_column"
                )
        return
    clashes = [
        (key, value)
        for key, value in (
            ("input.text_column", cfg.text_column),
            ("input.target_column", cfg.target_column),
            ("input.prefix", cfg.prefix or None),
        )
        if value is not None
    ]
    if clashes:
        key, value = clashes[0]
        unset = f"{key}=''" if key == "input.prefix" else f"{key}=null"
        raise UserError(
            f"config key input.messages_column: a conversation is the whole scored sequence; "
            f"drop {key} ({_show(value)}, or set {unset})"
        )
    if cfg.long_documents != "truncate":
        raise UserError(
            "config key input.messages_column: conversations are cut at input.max_length; "
            "input.long_documents=windows scores plain texts"
        )
    if cfg.score_roles is not None and not cfg.score_roles:
        raise UserError("config key input.score_roles: name at least one role, or null for all")


def _validate_teacher_columns(output: OutputConfig) -> None:
    """output.probes, output.temperatures and output.samples add columns to token rows."""
    asked = [
        key
        for key, on in (
            ("output.probes", output.probes),
            ("output.temperatures", output.temperatures),
            ("output.samples", output.samples),
        )
        if on
    ]
    if asked and output.level == "documents":
        raise UserError(
            f"config key {asked[0]}: adds columns to token rows; output.level=documents has none"
        )
    for probe in output.probes:
        if not probe:
            raise UserError("config key output.probes: a probe is an empty string")
    if len(set(output.probes)) < len(output.probes):
        raise UserError("config key output.probes: a probe is listed twice")
    for value in output.temperatures:
        if not 0 < value < float("inf"):
            raise UserError(
                f"config key output.temperatures: must be a finite number above 0, got {value}"
            )
    if not 0 <= output.samples <= MAX_SAMPLES:
        raise UserError(
            f"config key output.samples: must be 0 to {MAX_SAMPLES}, got {output.samples}"
        )
    if not 0 < output.sample_temperature < float("inf"):
        raise UserError(
            "config key output.sample_temperature: must be a finite number above 0, "
            f"got {output.sample_temperature}"
        )
    if not 0 <= output.seed < 2**63:
        raise UserError(f"config key output.seed: must be 0 to 2**63 - 1, got {output.seed}")
