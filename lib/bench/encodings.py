"""The storage part: the same top-k rows in every encoding; bytes, errors, write and read rates."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lib import sample
from lib.bench.runs import job_config, run_job_timed
from lib.bench.workloads import ModelSpec, case_texts, write_texts

# The storage part: a 32k-vocabulary GPT-2 with peaked, frequency-skewed distributions (like a
# trained model's; lib.sample.build_peaked_causal), the same extracted rows in every encoding.
STORAGE = ModelSpec("gpt2-peaked-32k", "gpt2", 64, 2, 32000, "causal")


STORAGE_K = 64


STORAGE_ENCODINGS = {
    "plain float16": {"dtype": "float16"},
    "plain float32": {"dtype": "float32"},
    "compact": {"encoding": "compact"},
    "compact top_p=0.95 min_k=2": {"encoding": "compact", "top_p": 0.95, "min_k": 2},
}


# The compact encoding's design target: all part-* bytes within this much per stored entry plus
# per position.
TARGET_BYTES_PER_ENTRY, TARGET_BYTES_PER_POSITION = 2.0, 12.0


def _column_bytes(path: Path, positions: int) -> dict[str, float]:
    """Compressed bytes a position of each column takes (a list's values under its name), and
    the rest of the file (footer, the compact id order) as `footer`."""
    metadata = pq.read_metadata(path)
    sizes: dict[str, int] = {}
    for group in range(metadata.num_row_groups):
        for i in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(i)
            name = chunk.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + chunk.total_compressed_size
    sizes["footer"] = path.stat().st_size - sum(sizes.values())
    return {name: round(size / positions, 2) for name, size in sizes.items()}


def _stored_errors(decoded: dict, exact: np.ndarray, token_logprob: np.ndarray) -> dict:
    """The largest error, in nats, of every stored finite top-k log-probability and of every
    token log-probability, against the float32 ones the reduction computed."""
    width = decoded["topk_logprobs"].shape[1]
    kept = np.arange(width) < decoded["topk_count"][:, None]
    stored, exact = decoded["topk_logprobs"][kept].astype(np.float64), exact[:, :width][kept]
    finite = np.isfinite(exact)
    token_error = np.abs(decoded["token_logprob"].astype(np.float64) - token_logprob)
    return {
        "max_error_nats": float(np.abs(stored - exact)[finite].max(initial=0.0)),
        "below_20_share": float((exact[finite] < -20).mean()),
        "token_logprob_max_error_nats": float(np.nanmax(token_error, initial=0.0)),
    }


def _stats(arrays: dict, settings: dict) -> dict[str, np.ndarray]:
    """The reduction's arrays as an encoding stores them (and their kept counts, with top_p)."""
    from lib.extract import reduce

    encoding, dtype = settings.get("encoding", "plain"), settings.get("dtype", "float32")
    stats = {key: arrays[key] for key in ("has_token", "token_logprob", "token_rank", "entropy")}
    stats["logsumexp"], stats["topk_ids"] = arrays["logsumexp"], arrays["topk_ids"]
    stats["topk_logits"] = arrays["topk_logits"].astype(dtype if encoding == "plain" else "float32")
    if settings.get("top_p", 1.0) < 1:
        counts = reduce.kept_counts(
            torch.tensor(arrays["topk_logits"]),
            torch.tensor(arrays["logsumexp"]),
            settings["top_p"],
            settings["min_k"],
        )
        stats["topk_count"] = counts.numpy()
    return stats


def storage_row(name: str, settings: dict, arrays: dict, vocab: int, root: Path) -> dict:
    """One encoding of the extracted rows: bytes (per column too), error, write and read rates.

    Writing is the job's own path (rows.to_table, ShardWriter, commit: Parquet encoding,
    zstd, fsync, sha256); reading is results.load_arrays (decoded (N, k) arrays)."""
    from lib import results
    from lib.output import rows, writer
    from lib.output.layout import UNITS

    encoding = settings.get("encoding", "plain")
    dtype = settings.get("dtype", "float32")
    ids = pa.array(arrays["id"])
    schema = rows.output_schema(ids.type, STORAGE_K, vocab, dtype, full=False, encoding=encoding)
    stats = _stats(arrays, settings)
    exact = arrays["topk_logits"].astype(np.float64) - arrays["logsumexp"][:, None]
    positions = len(arrays["position"])
    out = root / f"out-storage-{name.replace(' ', '-')}"

    def write() -> float:
        shutil.rmtree(out, ignore_errors=True)
        (out / UNITS).mkdir(parents=True)
        started = time.perf_counter()
        table = rows.to_table(
            schema, ids, np.arange(positions), arrays["position"], arrays["token_id"], stats
        )
        shard = writer.ShardWriter(out, "part-00000", schema, "parquet")
        shard.write(table)
        writer.commit([shard], _record(positions), lambda: None)
        return time.perf_counter() - started

    def read() -> tuple[float, dict]:
        started = time.perf_counter()
        decoded = results.load_arrays(out)
        return time.perf_counter() - started, decoded

    write_s = min(write() for _ in range(2))
    (read_s, decoded), (again_s, _) = read(), read()
    path = out / "tokens" / "part-00000.parquet"
    size = path.stat().st_size
    entries = int(decoded["topk_count"].sum())
    width = decoded["topk_ids"].shape[1]  # no manifest here: as wide as the longest row
    kept = np.arange(width) < decoded["topk_count"][:, None]
    assert (decoded["topk_ids"][kept] == arrays["topk_ids"][:, :width][kept]).all(), name
    return {
        "encoding": name,
        "positions": positions,
        "entries_per_position": round(entries / positions, 2),
        "bytes_per_position": round(size / positions, 2),
        "bytes_per_entry": round(size / entries, 3),
        "target_ratio": round(
            size / (TARGET_BYTES_PER_ENTRY * entries + TARGET_BYTES_PER_POSITION * positions), 3
        ),
        **{
            key: round(value, 5)
            for key, value in _stored_errors(decoded, exact, arrays["token_logprob"]).items()
        },
        "write_positions_s": round(positions / write_s),
        "read_positions_s": round(positions / min(read_s, again_s)),
        "columns": _column_bytes(path, positions),
    }


def storage(root: Path, training_texts: list[str], args) -> list[dict]:
    """Bytes per position and per entry, and write and read rates, of every encoding, on rows
    extracted once (float32, k = 64) from the peaked 32k-vocabulary model."""
    from lib import results

    model = root / "models" / STORAGE.name
    if not (model / "config.json").exists():
        sample.build_peaked_causal(
            model, training_texts, d_model=STORAGE.d_model, num_layers=STORAGE.layers
        )
    corpus = write_texts(
        root / "corpus-storage.parquet", case_texts("lognormal", args.storage_rows)
    )
    config = job_config(str(model), corpus, str(root / "out-storage-extract"), args, k=STORAGE_K)
    config.output.dtype, config.output.shard_rows = "float32", args.storage_rows
    run_job_timed(config)
    arrays = results.load_arrays(config.output.dir)
    return [
        storage_row(name, settings, arrays, STORAGE.vocab, root)
        for name, settings in STORAGE_ENCODINGS.items()
    ]


def _record(positions: int):
    """A unit record for a shard written outside a job (only its shard entry matters)."""
    from lib.output.records import UnitRecord, UnitSpan

    span = UnitSpan(0, "bench", 0, positions)
    return UnitRecord("bench", 0, "bench", span, 0, 0, 0, 0, 0, 0, 0.0, 0.0, {}, [], {}, [])
