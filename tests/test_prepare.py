"""resume: what a run makes of an output directory before it works in it.

Fresh, resumable, finished, damaged, another job's, or an impossible place: each is decided here
on hand-made directories, with no model involved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib import storage
from lib.config import load_config
from lib.errors import UserError
from lib.extract.corpus import InputFile, WorkUnit
from lib.output import layout, resume
from lib.output.records import Manifest, ShardEntry, Totals, UnitRecord, UnitSpan

UNITS = [WorkUnit(0, "in.parquet", 0, 3, 0), WorkUnit(1, "in.parquet", 3, 5, 3)]
FILES = [{"path": "in.parquet", "size": 10, "rows": 5, "sha256": "a" * 64}]


def _config(out_dir, *overrides):
    return load_config(None, ["model.path=m", "input.path=i", f"output.dir={out_dir}", *overrides])


def _prepare(out_dir: Path, fp: str = "fp1", *overrides, files=FILES) -> resume.Prepared:
    out_dir.mkdir(parents=True, exist_ok=True)
    return resume.prepare_output(out_dir, fp, files, UNITS, _config(out_dir, *overrides), "run1")


def _commit(out_dir: Path, unit: WorkUnit, fp: str = "fp1", data: bytes = b"rows") -> None:
    """A committed shard as the writer leaves it: the file and a record with its checksum."""
    shard = layout.shard_path(out_dir, unit.name, "parquet")
    shard.write_bytes(data)
    sha256, size = storage.sha256(shard)
    entry = ShardEntry(layout.shard_name(unit.name, "parquet"), 1, size, sha256)
    span = UnitSpan(unit.index, unit.file, unit.start, unit.stop)
    record = UnitRecord(fp, 0, "run1", span, 1, 1, 0, 0, 1, 1, 0.0, 0.0, {}, [], {}, [])
    record.files = [entry]
    layout.record_path(out_dir, unit.name).write_text(json.dumps(record.to_json()))


def _manifest(out_dir: Path, fp: str) -> Manifest:
    """A manifest whose contents beyond its fingerprint do not matter here."""
    totals = Totals(5, 5, 0, 0, 2)
    config = _config(out_dir)
    return Manifest(3, fp, config, {}, [], None, "parquet", 1, [], totals, {}, {}, [])


def _finish(out_dir: Path, fp: str = "fp1") -> Manifest:
    _prepare(out_dir, fp)
    for unit in UNITS:
        _commit(out_dir, unit, fp)
    manifest = _manifest(out_dir, fp)
    (out_dir / layout.MANIFEST).write_text(json.dumps(manifest.to_json()))
    (out_dir / layout.SKIPPED).write_bytes(b"")
    (out_dir / layout.SUCCESS).write_bytes(b"")
    return manifest


def _names(out_dir: Path) -> list[str]:
    return sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())


def test_fresh_directory_gets_a_job_record_and_its_folders(tmp_path):
    prepared = _prepare(tmp_path / "out")
    record = json.loads((tmp_path / "out" / layout.JOB).read_text())
    assert record == prepared.record
    assert (record["fingerprint"], record["run_id"], record["inputs"]) == ("fp1", "run1", FILES)
    assert prepared.recomputed == [] and prepared.healed == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [layout.JOB, layout.UNITS, layout.TOKENS, layout.TMP, layout.SKIPPED_DIR]
    )


def test_finished_job_is_recognised_without_writing(tmp_path):
    out = tmp_path / "out"
    manifest = _finish(out)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}
    assert resume.finished(out, "fp1", UNITS, "parquet", "tokens") == manifest
    assert resume.finished(out, "fp2", UNITS, "parquet", "tokens") is None
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")} == before


@pytest.mark.parametrize(
    "damage",
    ["flip a byte", "truncate", "delete record", "empty record", "delete manifest", "empty job"],
)
def test_damage_makes_a_finished_job_unfinished_and_is_repaired(tmp_path, damage):
    out = tmp_path / "out"
    _finish(out)
    shard = layout.shard_path(out, "part-00001", "parquet")
    record = layout.record_path(out, "part-00001")
    if damage == "flip a byte":
        shard.write_bytes(b"rowz")
    elif damage == "truncate":
        shard.write_bytes(b"ro")
    elif damage == "delete record":
        record.unlink()
    elif damage == "empty record":
        record.write_text("")
    elif damage == "delete manifest":
        (out / layout.MANIFEST).unlink()
    else:
        (out / layout.JOB).write_text("")
    assert resume.finished(out, "fp1", UNITS, "parquet", "tokens") is None
    prepared = _prepare(out)
    shard_damaged = damage in ("flip a byte", "truncate", "delete record", "empty record")
    assert prepared.recomputed == (["tokens/part-00001.parquet"] if shard_damaged else [])
    why = (
        "failed its checksum" if damage in ("flip a byte", "truncate") else "has no readable record"
    )
    assert prepared.problems == (
        [f"shard tokens/part-00001.parquet {why}"] if shard_damaged else []
    )
    # The proven shard stays; the unproven one is gone with its record; the end files too.
    assert _names(out) == sorted(
        [layout.JOB, "_units/part-00000.json", "tokens/part-00000.parquet"]
        + ([] if shard_damaged else ["_units/part-00001.json", "tokens/part-00001.parquet"])
    )
    assert resume.committed(out, UNITS, "parquet", "tokens") == ({0} if shard_damaged else {0, 1})


def test_a_unit_with_a_missing_shard_names_the_missing_one(tmp_path):
    """At output.level=both a unit whose token shard is gone: the problem names that shard, not
    the document shard beside it, and both are recomputed."""
    names = ["tokens/part-00003.parquet", "documents/part-00003.parquet"]
    visible = {names[1]: tmp_path / "d.parquet"}
    assert resume.unit_problem(names, "fp", visible, None) == (
        "shard tokens/part-00003.parquet is missing"
    )
    assert resume.unit_problem(names, "fp", {}, None) == resume.ABSENT
    visible = {name: tmp_path / name for name in names}
    assert resume.unit_problem(names, "fp", visible, None) == (
        "shard tokens/part-00003.parquet has no readable record"
    )


def test_shards_of_another_fingerprint_are_not_trusted(tmp_path):
    out = tmp_path / "out"
    _prepare(out)
    _commit(out, UNITS[0], fp="fp1")
    (out / layout.JOB).unlink()  # lost: rebuilt from records that carry our fingerprint
    prepared = _prepare(out)
    assert prepared.healed == [layout.JOB] and prepared.recomputed == []
    _commit(out, UNITS[1], fp="other")
    (out / layout.JOB).unlink()
    with pytest.raises(UserError, match="holds another job's output"):
        _prepare(out)


def test_foreign_files_are_refused_unless_overwrite_which_keeps_them(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds other files"):
        _prepare(tmp_path)
    assert _names(tmp_path) == ["notes.txt"]
    _prepare(tmp_path, "fp1", "output.overwrite=true")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_different_job_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    _finish(out)
    with pytest.raises(UserError, match="different job.*output.overwrite=true"):
        _prepare(out, "fp2")
    assert resume.finished(out, "fp1", UNITS, "parquet", "tokens") is not None
    _prepare(out, "fp2", "output.overwrite=true")
    assert _names(out) == [layout.JOB]


def test_an_edited_input_file_is_named(tmp_path):
    out = tmp_path / "out"
    _finish(out)
    edited = [{**FILES[0], "sha256": "b" * 64}]
    with pytest.raises(UserError, match="input file in.parquet changed since this output was"):
        _prepare(out, "fp2", files=edited)


@pytest.mark.parametrize(
    "now,message",
    [
        (
            {"commit": "bbb"},
            r"the model changed since this output was started \(commit aaa, now bbb\)",
        ),
        (
            {"commit": "aaa", "file": ("model.safetensors", 9, "f" * 64)},
            r"model's files changed.*model.safetensors differs",
        ),
    ],
    ids=["hub-commit", "local-files"],
)
def test_a_changed_model_is_named(tmp_path, now, message):
    """A resume whose model is not the one the output was started with: the hub snapshot moved
    on, or the files of a local directory were replaced."""
    out = tmp_path / "out"
    out.mkdir()
    weights = ("model.safetensors", 9, "e" * 64)
    before = {"identity": {"commit": "aaa"}, "files": [weights]}
    resume.prepare_output(out, "fp1", FILES, UNITS, _config(out), "run1", model=before)
    after = {"identity": {"commit": now["commit"]}, "files": [now.get("file", weights)]}
    with pytest.raises(UserError, match=message):
        resume.prepare_output(out, "fp2", FILES, UNITS, _config(out), "run2", model=after)


def test_temporaries_of_dead_writers_go_and_live_ones_stay(tmp_path):
    out = tmp_path / "out"
    _prepare(out)
    dead = out / layout.TMP / f"part-00000.parquet@{layout.writer_tag().split('@')[0]}@999999@1.tmp"
    other_host = out / layout.TMP / "part-00001.parquet@elsewhere@12@34.tmp"
    mine = layout.temp_path(out, out / "x.json")
    for path in (dead, other_host, mine):
        path.write_bytes(b"partial")
    assert layout.remove_dead_temporaries(out) == 3
    assert layout.temporaries(out) == []


def test_inputs_whose_glob_or_folder_would_read_the_output_are_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = [InputFile(str(corpus / "a.parquet"), 1, 1)]
    with pytest.raises(UserError, match="is inside input.path"):
        resume.check_layout(str(corpus), corpus / "out", files)
    with pytest.raises(UserError, match="holds input file"):
        resume.check_layout(str(corpus), tmp_path, files)
    with pytest.raises(UserError, match="matches the job's own shards"):
        resume.check_layout(f"{tmp_path}/**/*.parquet", tmp_path / "out", files)
    resume.check_layout(f"{corpus}/*.parquet", tmp_path / "out", files)  # fine
    resume.check_layout(str(corpus), tmp_path / "out", files)  # fine


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = [InputFile(str(corpus / "a.parquet"), 1, 1)]
    taken = tmp_path / "taken"
    taken.write_text("a user's file")
    with pytest.raises(UserError) as error:
        resume.check_layout(str(corpus), taken, files)
    assert str(error.value) == f"output.dir {taken} is a file; expected a directory"
    with pytest.raises(UserError) as error:
        resume.check_layout(str(corpus), taken / "run1", files)
    assert str(error.value) == f"output.dir {taken / 'run1'}: {taken} is a file, not a directory"
    resume.check_layout(str(corpus), tmp_path / "new" / "run1", files)  # created when needed


@pytest.mark.parametrize(
    "then,now,expected",
    [
        (["output.k=20"], ["output.k=10"], "output.k: 20, now 10"),
        (["output.level=tokens"], ["output.level=both"], 'output.level: "tokens", now "both"'),
        (
            ["decoder.mode=generate", "decoder.max_new_tokens=32"],
            ["decoder.mode=start", "decoder.max_new_tokens=32"],
            'decoder.mode: "generate", now "start"',
        ),
        (
            ["output.top_p=0.9", "output.min_k=5"],
            ["output.min_k=5"],
            "output.top_p: 0.9, now 1.0",
        ),
        ([], ["output.encoding=compact"], 'output.encoding: "plain", now "compact"'),
        (
            ["output.level=both", "output.min_k_fraction=0.1"],
            ["output.level=both"],
            "output.min_k_fraction: 0.1, now 0.2",
        ),
        (["runtime.threads=2"], ["runtime.threads=4"], None),  # not an output setting
    ],
)
def test_a_refused_resume_names_what_changed(then, now, expected):
    base = ["model.path=m", "input.path=i", "output.dir=o"]
    previous = {"config": load_config(None, [*base, *then]).to_dict()}
    assert resume.changed_settings(previous, load_config(None, [*base, *now])) == expected
