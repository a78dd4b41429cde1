"""Finding a checkpoint (a local directory, or a hub id in the cache or on the hub) and saying
in one line why one does not load."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from lib.config import ModelConfig
from lib.errors import UserError

log = logging.getLogger(__name__)

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _offline_variable() -> str | None:
    """The environment variable that turns the hub's offline mode on, None when it is off."""
    for name in _OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no"):
            return name
    return None


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    # OSError and ValueError carry a readable message; anything else needs its type to make sense.
    if isinstance(exc, OSError | ValueError) and line:
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def could_be_hub_id(path: str) -> bool:
    """`org/name` or `name`, and no such file or directory; anything else that does not exist
    is a mistyped local path."""
    if os.path.exists(path) or path.startswith(("/", ".", "~")):
        return False
    return path.count("/") <= 1 and "\\" not in path


def load_error(path: str, exc: Exception) -> UserError:
    """Say why `path` did not load: a file, a broken directory, no such directory, or the hub."""
    log.debug("loading %s failed", path, exc_info=exc)
    offline = _offline_variable()
    if os.path.isfile(path):
        return UserError(
            f"model.path {path} is a file; expected a checkpoint directory or a hub id"
        )
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            return UserError(
                f"model.path {path}: the directory has no config.json, so it is not a "
                "Hugging Face checkpoint"
            )
        return UserError(
            f"model.path {path}: cannot load the checkpoint in this directory: {_error_text(exc)}"
        )
    if not could_be_hub_id(path):
        return UserError(f"model.path {path}: no such directory")
    if offline:
        return UserError(
            f"model.path {path}: no such local directory, and the hub id is not in "
            "the local cache; the hub was not asked because offline mode is on "
            f"({offline}=1)"
        )
    return UserError(
        f"model.path {path}: no such local directory, and the hub could not provide "
        f"it: {_error_text(exc)}"
    )


def _remote_code_error(path: str, exc: Exception) -> UserError | None:
    if "trust_remote_code" in str(exc):
        return UserError(
            f"model.path {path}: the checkpoint needs its own Python code to load; "
            "set model.trust_remote_code=true only if you trust that code"
        )
    return None


def _may_have_pickled_weights(path: str) -> bool:
    """False for a local directory without .bin/.pt files: its weights are missing, not refused."""
    if not os.path.isdir(path):
        return True  # a hub id: it cannot be listed offline, so assume the refusal is the reason
    return any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in os.listdir(path))


def _hub_not_asked(cfg: ModelConfig) -> str | None:
    """The setting that keeps the hub from being asked for files missing from the cache (e.g.
    `HF_HUB_OFFLINE=1`); None when it is asked."""
    offline = _offline_variable()
    if offline:
        return f"{offline}=1"
    return "model.local_files_only=true" if cfg.local_files_only else None


def _cached_snapshot(cfg: ModelConfig) -> Path | None:
    """The hub cache's snapshot directory for model.path at model.revision (the one holding its
    config.json); None for a local directory or a hub id whose config.json is not cached."""
    if not could_be_hub_id(cfg.path):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(cfg.path, "config.json", cfg.cache_dir, cfg.revision)
    except ValueError:  # not a valid repo id (e.g. `a b`): nothing of it can be cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def _weightless_snapshot(cfg: ModelConfig) -> UserError | None:
    """A UserError when the hub is not asked and the cached snapshot has no weights file: the
    cache then holds a config and a tokenizer whose weights were never downloaded."""
    reason = _hub_not_asked(cfg)
    snapshot = _cached_snapshot(cfg) if reason else None
    if snapshot is None:
        return None
    weights = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")
    # A file whose blob was deleted from the cache is a dangling link: is_file() is False.
    if any(f.name.endswith(weights) and f.is_file() for f in snapshot.iterdir()):
        return None
    command = " ".join(
        [f"hf download {cfg.path}"]
        + ([f"--revision {cfg.revision}"] if cfg.revision else [])
        + ([f"--cache-dir {cfg.cache_dir}"] if cfg.cache_dir else [])
    )
    return UserError(
        f"model.path {cfg.path}: the cached snapshot {snapshot} has no weights file "
        f"(model.safetensors or pytorch_model.bin) and the hub was not asked ({reason}); "
        f"download the weights where there is a network ({command}), then run again"
    )


@contextlib.contextmanager
def about_the_checkpoint(cfg: ModelConfig, *, weights: bool = False):
    """Whatever from_pretrained raises (missing files, bad JSON, corrupt weights, hub errors) is
    about the checkpoint the user named: it becomes a one-line UserError naming it. With
    `weights`, a cached hub snapshot without a weights file is named as the cause."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if weights and (weightless := _weightless_snapshot(cfg)):
            raise weightless from None
        refused = isinstance(exc, OSError) and "safetensors" in str(exc).lower()
        if not cfg.allow_pickle and refused and _may_have_pickled_weights(cfg.path):
            raise UserError(
                f"model.path {cfg.path}: no safetensors weights; pickled weights can "
                "run code when loaded, so they need model.allow_pickle=true"
            ) from None
        raise _remote_code_error(cfg.path, exc) or load_error(cfg.path, exc) from None


def hub_options(cfg: ModelConfig) -> dict:
    """What every from_pretrained call gets: the same revision, cache and offline choice."""
    return {
        "trust_remote_code": cfg.trust_remote_code,
        "revision": cfg.revision,
        "local_files_only": cfg.local_files_only,
        "cache_dir": cfg.cache_dir,
    }


def snapshot_commit(cfg: ModelConfig) -> str | None:
    """The commit of the hub snapshot the model was loaded from (None for a local directory):
    the cache keeps each commit's files under snapshots/<commit>/."""
    if os.path.isdir(cfg.path):
        return None
    from transformers.utils import cached_file

    options = {k: v for k, v in hub_options(cfg).items() if k != "trust_remote_code"}
    resolved = Path(cached_file(cfg.path, "config.json", **options))
    return resolved.parent.name if resolved.parent.parent.name == "snapshots" else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` (name lookup included).
    Behind a proxy the answer is yes: the proxy decides."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a stuck name lookup is abandoned
    thread.start()
    thread.join(timeout)
    return bool(opened and opened[0])


def unreachable_hub(cfg: ModelConfig) -> ModelConfig:
    """A hub id with no hub in reach loads from the local cache only, at once, instead of
    retrying for half a minute; the error, if it is not cached, says what to do."""
    offline = _offline_variable() is not None
    if not could_be_hub_id(cfg.path) or cfg.local_files_only or offline or hub_reachable():
        return cfg
    return dataclasses.replace(cfg, local_files_only=True)
