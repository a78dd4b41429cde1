"""The state of an output directory: fresh, resumable, finished, damaged or another job's.

A job is identified by its fingerprint (model, tokenizer, output-affecting keys and the sha256 of
every input file's bytes). A shard counts as done only when its unit record carries this job's
fingerprint and a checksum that the file on disk still matches; anything else is recomputed.
Missing or damaged bookkeeping (`_job.json`, `_manifest.json`, unit records) is rebuilt from
what the checksummed shards prove.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from lib import storage
from lib.config import JobConfig, from_record
from lib.errors import UserError, output_error
from lib.extract import chat, pins
from lib.extract.corpus import InputFile, WorkUnit
from lib.output import compact, layout
from lib.output.records import Manifest, UnitRecord
from lib.storage import AnyPath

log = logging.getLogger(__name__)


def _model_files(path: str) -> list[tuple[str, int, str]]:
    """Name, size and sha256 of every file of a local checkpoint (weights, tokenizer, config),
    so a resume with other weights under the same path is refused; a hub checkpoint is pinned
    by the snapshot commit in the model identity instead."""
    if not os.path.isdir(path):
        return []
    files = sorted(p for p in Path(path).iterdir() if p.is_file())
    return [(p.name, *reversed(storage.sha256(p))) for p in files]


def input_checksums(inputs: list[InputFile]) -> list[dict]:
    """Path, size, rows and what proves the bytes unchanged, read through each file's pin
    (lib/extract/pins.py): the sha256 of a local file, an S3 object's ETag, another store's
    modification time (hashing would download the whole corpus before the first batch)."""
    held = [item.pin or pins.pin(item.path) for item in inputs]
    try:
        proofs = pins.proofs(held)
    finally:
        for item, pin in zip(inputs, held, strict=True):
            if pin is not item.pin:
                pin.close()
    return [
        {"path": item.path, "rows": item.rows, **proof}
        for item, proof in zip(inputs, proofs, strict=True)
    ]


def _proof(item: dict) -> object:
    """What stands for an input file's bytes: its sha256, an object's ETag or its time."""
    return item.get("sha256") or item.get("etag") or item.get("modified")


def model_record(path: str, identity: dict) -> dict:
    """What pins the model: its identity (with the hub snapshot's commit) and, for a local
    directory, its files' checksums."""
    return {"identity": identity, "files": _model_files(path)}


def fingerprint(config: JobConfig, files: list[dict], model: dict) -> str:
    """Hash of all that changes the output: model, tokenizer, output-affecting keys, input bytes."""
    payload = {
        "layout": layout.FORMAT_VERSION,
        **_settings(config),
        "identity": model["identity"],
        "model_files": model["files"],
        "files": [(f["path"], f["size"], f["rows"], _proof(f)) for f in files],
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def _settings(config: JobConfig) -> dict[str, dict]:
    """The config keys that change the output, by section, as the fingerprint hashes them."""
    c = config.to_dict()
    decoder = (
        dict(c["decoder"]) if c["decoder"]["mode"] == "generate" else {"mode": c["decoder"]["mode"]}
    )
    return {
        "model": {"path": c["model"]["path"], "dtype": c["model"]["dtype"]},
        "input": _input_settings(config),
        "decoder": decoder,
        "output": {
            key: c["output"][key]
            for key in ("logits", "k", "dtype", "format", "shard_rows", "rows", "level")
        }
        | ({} if config.output.level == "tokens" else {"min_k": config.output.min_k_fraction})
        | _topk_storage(config)
        | _teacher_columns(config),
    }


# Input keys hashed only when set, so that outputs written before they existed keep their
# fingerprints.
_CONVERSATION_KEYS = ("messages_column", "chat_template", "score_roles")


def _input_settings(config: JobConfig) -> dict:
    """The input section as hashed: the conversation keys only where set, with the bytes of a
    chat template file (a changed file renders other tokens)."""
    c = config.to_dict()["input"]
    keys = {key: value for key, value in c.items() if key not in _CONVERSATION_KEYS}
    if config.input.messages_column is None:
        return keys
    keys |= {key: c[key] for key in _CONVERSATION_KEYS if c[key] is not None}
    template = chat.template_text(config.input.chat_template)
    if template is not None and template != config.input.chat_template:
        keys["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()
    return keys


def _teacher_columns(config: JobConfig) -> dict:
    """output.probes, temperatures and samples (with their temperature and seed) where set."""
    out = config.output
    keys = {}
    if out.probes:
        keys["probes"] = list(out.probes)
    if out.temperatures:
        keys["temperatures"] = list(out.temperatures)
    if out.samples:
        keys |= {
            "samples": out.samples,
            "sample_temperature": out.sample_temperature,
            "seed": out.seed,
        }
    return keys


def changed_settings(previous: dict, config: JobConfig) -> str | None:
    """The output-changing keys whose values differ from the ones `previous` (a `_job.json`)
    was started with, as `key: then, now value`; None when none does or it cannot tell."""
    then = from_record(previous.get("config") or {})
    if then is None:
        return None
    before, now = _settings(then), _settings(config)
    changed = []
    for section in now:
        for key in dict.fromkeys([*now[section], *before[section]]):
            name = _HASHED_AS.get(f"{section}.{key}", f"{section}.{key}")
            if key in now[section] and key in before[section]:
                was, is_ = before[section][key], now[section][key]
            elif key == "compact_version":  # the encoding key names the change
                continue
            elif hasattr(getattr(config, section), name.split(".", 1)[1]):
                # hashed on one side only (it applies there): compare the config values
                field = name.split(".", 1)[1]
                was, is_ = (
                    getattr(getattr(then, section), field),
                    getattr(getattr(config, section), field),
                )
            else:  # a derived value (a template file's hash): the hashed values
                was, is_ = before[section].get(key), now[section].get(key)
            if was != is_:
                changed.append(f"{name}: {json.dumps(was)}, now {json.dumps(is_)}")
    return "; ".join(changed) or None


# Keys the fingerprint hashes under other names than the config's (kept: a rename would change
# every fingerprint, and resumes of outputs started before it would be refused).
_HASHED_AS = {
    "output.min_k": "output.min_k_fraction",
    "output.top_p_min_k": "output.min_k",
    "output.compact_version": "the compact code version",
}


def _topk_storage(config: JobConfig) -> dict:
    """The top-k storage keys that change the output, only where they are not the default, so
    that outputs written before they existed keep their fingerprints."""
    out = config.output
    keys = {} if out.encoding == "plain" else {"encoding": out.encoding}
    if out.encoding == "compact":  # a resume never mixes code versions in one output
        keys["compact_version"] = compact.VERSION
    if out.top_p < 1:
        keys |= {"top_p": out.top_p, "top_p_min_k": out.min_k}
    return keys


# -- layouts that cannot work ------------------------------------------------------------------
def _within(path: AnyPath, folder: AnyPath) -> bool:
    """Whether `path` lies in `folder` (never, when one is local and the other a URI)."""
    return type(path) is type(folder) and path.is_relative_to(folder)


def check_layout(input_path: str, out_dir: AnyPath, inputs: list[InputFile]) -> None:
    """Refuse an output directory that cannot be one (a file), or whose shards the input path
    would read back as input."""
    if storage.is_remote(out_dir):
        if out_dir.is_file():  # a key and a prefix can share a name; readers then see the key
            raise UserError(
                f"output.dir {out_dir} is an object; expected a folder (a prefix) for the output"
            )
    else:
        existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
        if existing == out_dir and not existing.is_dir():
            raise UserError(f"output.dir {out_dir} is a file; expected a directory")
        if not existing.is_dir():
            raise UserError(f"output.dir {out_dir}: {existing} is a file, not a directory")
    out = out_dir.resolve()
    inside = [f.path for f in inputs if _within(storage.location(f.path).resolve(), out)]
    if inside:  # output.overwrite would delete them as the job's own files
        raise UserError(
            f"output.dir {out_dir} holds input file {inside[0]}; choose another output.dir"
        )
    source = storage.location(input_path)
    if source.is_dir() and _within(out, source.resolve()):
        raise UserError(
            f"output.dir {out_dir} is inside input.path {input_path}: a rerun would read the "
            "job's own shards as input; choose an output.dir outside it"
        )
    if not source.exists():
        probe = layout.shard_path(out, "part-00000", "parquet").as_posix()
        pattern = str(source) if storage.is_remote(source) else os.path.abspath(source)
        if storage.glob_regex(pattern).match(probe):
            raise UserError(
                f"input.path {input_path} matches the job's own shards in output.dir {out_dir}; "
                "choose an output.dir the pattern does not match"
            )


# -- is the job already done? ------------------------------------------------------------------
ABSENT = "absent"  # none of a unit's shards is there: nothing to prove, nothing to recompute


def unit_problem(
    names: list[str], fp: str, visible: dict[str, AnyPath], record: UnitRecord | None
) -> str | None:
    """None when a unit's shards (`names`, relative to OUT) are all proven by its `record`;
    else why not, or ABSENT when none is there. `visible`: the shards present
    (`layout.visible_shards`)."""
    present = [name in visible for name in names]
    if not any(present):
        return ABSENT
    if not all(present):
        return f"shard {names[present.index(False)]} is missing"
    if record is None:
        return f"shard {names[0]} has no readable record"
    if record.fingerprint != fp or [entry.file for entry in record.files] != names:
        return f"shard {names[0]} has the record of another job"
    for e in record.files:
        if not storage.matches(visible[e.file], size=e.bytes, digest=e.sha256, etag=e.etag):
            return f"shard {e.file} failed its checksum"
    return None


def _records(out_dir: AnyPath, units: list[WorkUnit], fmt: str, level: str, visible: dict):
    """The records of the units with a visible shard (the others need none)."""
    names = [
        unit.name
        for unit in units
        if any(n in visible for n in layout.shard_names(unit.name, fmt, level))
    ]
    return layout.read_records(out_dir, names)


def finished(
    out_dir: AnyPath, fp: str, units: list[WorkUnit], fmt: str, level: str
) -> Manifest | None:
    """The manifest of a finished job with this fingerprint whose every shard still matches its
    checksum; None otherwise. Reads only: a finished job re-run writes nothing."""
    if not (out_dir / layout.SUCCESS).exists():
        return None
    job = layout.read_json(out_dir / layout.JOB)
    manifest = layout.read_manifest(out_dir)
    if not job or job.get("fingerprint") != fp or not manifest or manifest.fingerprint != fp:
        return None
    if not (out_dir / layout.SKIPPED).is_file():
        return None  # (an output of an older version: the run moves its bookkeeping)
    visible = layout.visible_shards(out_dir, level)
    records = _records(out_dir, units, fmt, level, visible)
    for unit in units:
        names = layout.shard_names(unit.name, fmt, level)
        if unit_problem(names, fp, visible, records.get(unit.name)) is not None:
            return None
    refuse_foreign(out_dir, units, fmt, level)
    return manifest


def refuse_foreign(out_dir: AnyPath, units: list[WorkUnit], fmt: str, level: str) -> None:
    """Refuse a data folder holding anything but this job's shards: readers of OUT/tokens would
    read it as rows. Never deleted: the job did not write it."""
    ours = {name for unit in units for name in layout.shard_names(unit.name, fmt, level)}
    foreign = [name for name in layout.data_entries(out_dir, level) if name not in ours]
    if foreign:
        folder, more = foreign[0].split("/", 1)[0], len(foreign) - 1
        also = f" (and {more} more)" if more else ""
        raise UserError(
            f"output.dir {out_dir}: {foreign[0]}{also} is not a shard of this job, and readers "
            f"of {folder}/ would read it as rows; move it out of {folder}/ and run the same "
            "command again"
        )


# -- preparing a directory to work in ----------------------------------------------------------
@dataclass
class Prepared:
    """What `prepare_output` found and did."""

    record: dict
    recomputed: list[str] = field(default_factory=list)  # shards of units whose check failed
    healed: list[str] = field(default_factory=list)  # bookkeeping files rebuilt
    problems: list[str] = field(default_factory=list)  # why, a line per recomputed unit


def _changed_inputs(previous: dict, files: list[dict]) -> str | None:
    before = {f.get("path"): f for f in previous.get("inputs") or [] if isinstance(f, dict)}
    now = {f["path"]: f for f in files}
    if not before:
        return None
    for path, item in now.items():
        if path in before and _proof(before[path]) != _proof(item):
            return f"input file {path} changed since this output was started (its bytes differ)"
    added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
    if added or removed:
        return f"the input files changed since this output was started ({(added or removed)[0]} {'added' if added else 'removed'})"
    return None


def _foreign_records(out_dir: AnyPath, fp: str) -> bool:
    folder = out_dir / layout.UNITS
    if not folder.is_dir():
        return False
    for path in folder.glob("part-*.json"):
        record = layout.read_json(path)
        if record is not None and record.get("fingerprint") not in (None, fp):
            return True
    return False


def _changed_model(previous: dict, model: dict | None, path: str) -> str | None:
    """What changed in the model under the same `model.path`: the hub commit or local files."""
    before = previous.get("model")
    then_path = ((previous.get("config") or {}).get("model") or {}).get("path")
    if not isinstance(before, dict) or model is None or then_path != path:
        return None
    then, now = (before.get("identity") or {}).get("commit"), model["identity"].get("commit")
    if then != now:
        return f"the model changed since this output was started (commit {then}, now {now})"
    files = {tuple(f) for f in model["files"]} ^ {tuple(f) for f in before.get("files") or []}
    if files:
        name = sorted(files)[0][0]
        return f"the model's files changed since this output was started ({name} differs)"
    return None


def _refuse_or_clear(
    out_dir: AnyPath, fp: str, files: list[dict], config: JobConfig, model: dict | None
) -> list[str]:
    """Refuse a directory that holds something else unless output.overwrite; returns the
    bookkeeping files that will be rebuilt."""
    previous = layout.read_json(out_dir / layout.JOB)
    entries = [p.name for p in out_dir.iterdir() if p.name != layout.LOCK]
    overwrite = config.output.overwrite
    if previous is not None and previous.get("fingerprint") != fp:
        if overwrite:
            layout.clear(out_dir)
            return []
        changed = _changed_inputs(previous, files) or _changed_model(
            previous, model, config.model.path
        )
        if changed:
            raise UserError(
                f"output.dir {out_dir}: {changed}; restore it, or use "
                "output.overwrite=true to start over"
            )
        settings = changed_settings(previous, config)
        if settings:
            raise UserError(
                f"output.dir {out_dir} was started with other settings ({settings}); use a new "
                "directory, the same settings, or output.overwrite=true"
            )
        raise UserError(
            f"output.dir {out_dir} holds the output of a different job (model, input or "
            "output settings changed, or an older output format); use a new directory or "
            "output.overwrite=true"
        )
    if previous is None and entries:
        foreign = [name for name in entries if not layout.is_ours(name)]
        manifest = layout.read_json(out_dir / layout.MANIFEST) or {}
        theirs = _foreign_records(out_dir, fp) or manifest.get("fingerprint") not in (None, fp)
        if foreign or theirs:
            if not overwrite:
                what = "other files" if foreign and not theirs else "another job's output"
                raise UserError(
                    f"output.dir {out_dir} is not empty and holds {what}; "
                    "use a new directory or output.overwrite=true"
                )
            layout.clear(out_dir)
            return []
        proof = [out_dir / f for f in (layout.UNITS, layout.TOKENS, layout.DOCUMENTS)]
        if any(folder.is_dir() and any(folder.iterdir()) for folder in proof):
            return [layout.JOB]  # our own shards without their job record: rebuild it
    return []


def _check_shards(
    out_dir: AnyPath, units: list[WorkUnit], fmt: str, level: str, fp: str
) -> tuple[list[str], list[str]]:
    """Keep the shards their records prove, delete the rest of what the job wrote there (shards
    and records of its units); returns the shards to recompute and why, a line per unit."""
    failed, problems = [], []
    keep = set()
    visible = layout.visible_shards(out_dir, level)
    records = _records(out_dir, units, fmt, level, visible)
    for unit in units:
        names = layout.shard_names(unit.name, fmt, level)
        problem = unit_problem(names, fp, visible, records.get(unit.name))
        if problem is None:
            keep.update(names)
            keep.add(layout.relative(out_dir, layout.record_path(out_dir, unit.name)))
        elif problem != ABSENT:
            failed += names
            problems.append(problem)
    ours = {layout.relative(out_dir, layout.record_path(out_dir, unit.name)) for unit in units}
    ours |= {name for unit in units for name in layout.shard_names(unit.name, fmt, level)}
    for folder in (layout.TOKENS, layout.DOCUMENTS, layout.UNITS):
        if (out_dir / folder).is_dir():
            for path in (out_dir / folder).iterdir():
                name = layout.relative(out_dir, path)
                if name in ours and name not in keep:  # what it wrote, unproven
                    storage.remove(path)
    return failed, problems


def prepare_output(
    out_dir: AnyPath,
    fp: str,
    files: list[dict],
    units: list[WorkUnit],
    config: JobConfig,
    run_id: str,
    *,
    model: dict | None = None,
) -> Prepared:
    """Make `out_dir` ready for this run (main process, holding the lease): refuse another job's
    directory, drop what no checksum proves, rebuild lost bookkeeping, record this run."""
    try:
        healed = _refuse_or_clear(out_dir, fp, files, config, model)
        refuse_foreign(out_dir, units, config.output.format, config.output.level)
        if (out_dir / layout.SUCCESS).exists() or (out_dir / layout.MANIFEST).exists():
            if not layout.read_manifest(out_dir):
                healed.append(layout.MANIFEST)
        # Not finished any more (or not yet): the manifest is rebuilt at the end.
        names = (layout.SUCCESS, layout.MANIFEST, layout.SKIPPED, layout.OLD_SKIPPED)
        for name in (*names, layout.OLD_REPORT):
            (out_dir / name).unlink(missing_ok=True)
        layout.remove_dead_temporaries(out_dir)
        folders = (layout.UNITS, *layout.folders(config.output.level), layout.SKIPPED_DIR)
        for folder in (*folders, layout.TMP):
            (out_dir / folder).mkdir(exist_ok=True)
        fmt, level = config.output.format, config.output.level
        recomputed, problems = _check_shards(out_dir, units, fmt, level, fp)
        record = {
            "format_version": layout.FORMAT_VERSION,
            "fingerprint": fp,
            "run_id": run_id,
            "started": time.time(),
            "config": config.to_dict(),
            "inputs": files,
            "model": model,
        }
        layout.write_json(out_dir / layout.JOB, record, out_dir)
    except OSError as exc:
        raise output_error(getattr(exc, "filename", None) or out_dir, exc) from None
    for name in healed:
        log.warning("output.dir %s: %s was missing or damaged; rebuilt it", out_dir, name)
    return Prepared(record, recomputed, healed, problems)


def committed(out_dir: AnyPath, units: list[WorkUnit], fmt: str, level: str) -> set[int]:
    """The units that are done: their shards are visible (prepare_output removed every
    unproven one)."""
    visible = layout.visible_shards(out_dir, level)
    return {
        unit.index
        for unit in units
        if all(name in visible for name in layout.shard_names(unit.name, fmt, level))
    }
