"""What the integrity tests share: the corpus, the job's arguments, the clean run and what
"identical" means, and the ways a test damages files."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from lib import sample
from lib.inspect.verify import verify
from tests.launcher import Result, Run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ROWS = 48  # 20 + 28 rows in two files
SHARD_ROWS = 6  # 4 + 5 = 9 units, two of them ending a file early
UNITS = 9
NULL_ROW = 7  # a null text: skipped, so _skipped/skipped.parquet has a row


def held(point: str, release: Path) -> dict[str, str]:
    """The environment that holds a job at `point` (`name[:N]`) until `release` exists
    (lib/faults.py): the test does its part meanwhile, however slow the machine."""
    return {"LOGIT_EXTRACT_HOLD_AT": f"{point}={release}"}


# -- the corpus, the clean run and what "identical" means --------------------------------------


def write_corpus(folder: Path) -> str:
    """Two uncompressed Parquet files with string ids (uncompressed, so a test can edit a text
    in place without changing the file's size)."""
    texts = sample.generate_texts(ROWS, seed=31, mean_words=8)
    texts[NULL_ROW] = None
    ids = [f"doc-{i:02d}" for i in range(ROWS)]
    folder.mkdir(parents=True)
    for name, rows in (("a.parquet", slice(0, 20)), ("b.parquet", slice(20, ROWS))):
        table = pa.table({"text": pa.array(texts[rows], pa.string()), "doc_id": ids[rows]})
        pq.write_table(table, folder / name, compression="none", row_group_size=7)
    return str(folder)


def job_args(model: str, corpus: str, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"input.path={corpus}",
        f"output.dir={out}",
        "input.id_column=doc_id",
        "input.max_length=24",
        "batching.max_tokens=64",
        "output.k=5",
        f"output.shard_rows={SHARD_ROWS}",
        *extra,
    ]


def read_tokens(out: Path) -> pa.Table:
    """Every token row in OUT/tokens, sorted by (id, position)."""
    table = ds.dataset(out / "tokens", format="parquet").to_table()
    return table.sort_by([("id", "ascending"), ("position", "ascending")]).combine_chunks()


def shards(out: Path) -> list[str]:
    """The committed shards, as `tokens/part-NNNNN.parquet`."""
    folder = out / "tokens"
    return sorted(f"tokens/{p.name}" for p in folder.iterdir()) if folder.is_dir() else []


def leftovers(out: Path) -> list[str]:
    """What no run may leave once it has exited, however it failed: anything in `_tmp`, a
    `*.tmp` or `*.stale` file anywhere, a lease."""
    found = [p for p in out.rglob("*") if p.is_file() and p.name.endswith((".tmp", ".stale"))]
    found += [*(out / "_tmp").glob("*"), *out.glob("_lock.json")]
    return sorted({str(p.relative_to(out)) for p in found})


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file and folder under `folder` (a folder's mtime changes when
    anything is created or removed in it, even for a moment)."""
    paths = [folder, *folder.rglob("*")]
    return {str(p): (p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns) for p in paths}


def job_state(out: Path) -> dict[str, tuple[int, int]]:
    """A snapshot of what a refused run must leave alone: shards, unit records, job record."""
    record = out / "_job.json"
    state = {**snapshot(out / "tokens"), **snapshot(out / "_units")}
    return {**state, str(record): (record.stat().st_size, record.stat().st_mtime_ns)}


def holder_pid(out: Path) -> int | None:
    """The pid in OUT's lease file, None when there is none."""
    try:
        return json.loads((out / "_lock.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def wait_until(condition, run: Run, what: str, timeout: float = 60) -> None:
    """Poll `condition` every 10 ms until it holds; fail if `run` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if run.poll() is not None:
            pytest.fail(f"the run exited ({run.poll()}) before {what}: {run.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s: {run.tail()}")
        time.sleep(0.01)


@dataclass
class Clean:
    out: Path
    table: pa.Table
    manifest: dict


def read_clean(out: Path) -> Clean:
    return Clean(out, read_tokens(out), json.loads((out / "_manifest.json").read_text()))


def clean_run(launcher, model: str, inputs: str, out: Path) -> Clean:
    """The uninterrupted run that every scenario must reproduce."""
    launcher.start(job_args(model, inputs, out)).wait().assert_ok()
    reference = read_clean(out)
    assert len(reference.manifest["shards"]) == UNITS
    assert reference.manifest["totals"]["skipped_rows"] == 1
    assert leftovers(out) == []
    return reference


def assert_clean(out: Path, clean: Clean) -> None:
    """`out` holds exactly what the uninterrupted run wrote, and nothing else."""
    table = read_tokens(out)
    assert table.num_rows == clean.table.num_rows
    assert table.equals(clean.table)  # every column, every bit
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["shards"] == clean.manifest["shards"]  # names, rows, bytes and sha256
    assert manifest["totals"] == clean.manifest["totals"]
    assert (out / "_SUCCESS").is_file()
    assert leftovers(out) == []
    assert verify(out, check_input=True).problems == []


def stopped_line(result: Result, name: str, out: Path, committed: int) -> None:
    """A run stopped by a signal says so in one line of its own, the last on stderr, with the
    number of shards it left committed."""
    message = (
        f"stopped by {name}: {committed} shards committed in {out}; run the same command to resume"
    )
    assert result.lines == [message], result.stderr[-3000:]
    assert result.stderr.endswith(message + "\n"), result.stderr[-3000:]


def edit_in_place(path: Path) -> str:
    """Change one letter of a text in an uncompressed Parquet file, keeping the file's size and
    modification time; returns the new text."""
    before = path.stat()
    data = path.read_bytes()
    texts = pq.read_table(path).column("text").to_pylist()
    # A text whose bytes occur once in the file (not also as a row group's min or max).
    row = next(i for i, t in enumerate(texts) if t and data.count(t.encode()) == 1)
    at = data.index(texts[row].encode()) + 1  # the first word's second letter
    with open(path, "r+b") as handle:
        handle.seek(at)
        handle.write(b"q" if data[at : at + 1] != b"q" else b"z")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    edited = pq.read_table(path).column("text")[row].as_py()
    assert edited != texts[row] and len(edited) == len(texts[row])
    return edited


def zero_bytes(path: Path, count: int = 8) -> None:
    """Overwrite `count` bytes in the middle of the file with zeros (bytes that were not zero)."""
    data = path.read_bytes()
    at = next(i for i in range(len(data) // 2, len(data)) if any(data[i : i + count]))
    with open(path, "r+b") as handle:
        handle.seek(at)
        handle.write(bytes(count))
