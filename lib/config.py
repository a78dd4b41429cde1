"""Job configuration: dataclasses, YAML loading, `section.key=value` overrides, validation."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lib.errors import UserError

REQUIRED = "???"  # placeholder for keys that have no default


@dataclass
class ModelConfig:
    path: str = REQUIRED
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass
class InputConfig:
    path: str = REQUIRED
    text_column: str = "text"
    id_column: str | None = None
    target_column: str | None = None
    prefix: str = ""
    max_length: int = 512


@dataclass
class DecoderConfig:
    mode: str = "start"
    max_new_tokens: int = 64


@dataclass
class BatchingConfig:
    max_tokens: int = 16384


@dataclass
class OutputConfig:
    dir: str = REQUIRED
    logits: str = "topk"
    k: int = 20
    dtype: str = "float16"
    format: str = "parquet"
    shard_rows: int = 5000
    overwrite: bool = False


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The resolved config as plain data, for the manifest and the fingerprint."""
        return dataclasses.asdict(self)


CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "decoder.mode": ("start", "targets", "generate"),
    "output.logits": ("topk", "full"),
    "output.dtype": ("float16", "float32"),
    "output.format": ("parquet", "arrow"),
}
POSITIVE = ("input.max_length", "decoder.max_new_tokens", "output.k", "output.shard_rows")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    return "null" if tp is type(None) else tp.__name__


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type `tp`; ints are accepted where floats are."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    raise UserError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")


def _set(config: JobConfig, key: str, value: Any) -> None:
    section_name, _, name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(JobConfig)}
    if section_name not in sections or not name:
        raise UserError(f"unknown config key {key!r}; sections are {', '.join(sections)}")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise UserError(
            f"unknown config key {key!r}; {section_name} has {', '.join(hints)}"
        )
    setattr(section, name, _coerce(key, value, hints[name]))


def _flatten(data: Any, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    flat = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise UserError(f"{where}: section {section!r} must be a mapping of keys")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is read as YAML, so `k=5` is an int, `x=null` None."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise UserError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # A bare word that YAML reads as a date or similar stays the string the user typed.
    if not isinstance(value, bool | int | float | str | type(None)):
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Load a YAML config, apply `section.key=value` overrides, and validate the result."""
    config = JobConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
        for key, value in _flatten(data, str(path)).items():
            _set(config, key, value)
    for text in overrides:
        _set(config, *parse_override(text))
    validate(config)
    return config


def validate(config: JobConfig) -> None:
    """Reject missing required keys, unknown choices and out-of-range numbers, naming the key."""
    data = config.to_dict()
    for section, values in data.items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if value == REQUIRED:
                raise UserError(f"config key {key} is required")
            if key in CHOICES and value not in CHOICES[key]:
                raise UserError(f"config key {key}: expected one of {'|'.join(CHOICES[key])}, got {value!r}")
            if key in POSITIVE and value < 1:
                raise UserError(f"config key {key}: must be at least 1, got {value}")
    if config.batching.max_tokens < 8:
        raise UserError(f"config key batching.max_tokens: must be at least 8, got {config.batching.max_tokens}")
    if config.decoder.mode == "targets" and not config.input.target_column:
        raise UserError("config key input.target_column is required when decoder.mode=targets")
