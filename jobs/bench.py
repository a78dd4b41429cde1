"""Benchmark the job against the naive loop and the model's dense-batch speed: `make bench`.

Four parts, on the same machine and models:

- efficiency (log-normal corpus, N = --rows): the job (lib.pipeline.run_job) on N and 3N rows,
  so start-up cancels in the marginal rate, against (c) the model's dense throughput on
  equal-length batches of the corpus's mean length: efficiency = marginal job rate / (c).
  pipeline_efficiency times the model's forward passes alone on exactly the job's batches over
  the job's time, so it shows what the pipeline adds; efficiency also includes what the length
  mix itself costs the model. Also padding efficiency, peak RSS at N and 10N rows (separate
  processes), input_checksum_share (the 3N job's time hashing its input) and complete_rerun_s
  (a rerun over the finished 3N output, which re-hashes every shard). `--tiny` adds d_model 64,
  2-layer models, where the pipeline's own costs show.
- cases (--cases): the job against the naive loop a careful user writes (32 rows a batch in
  input order, padded to the longest, float32, top-k vectorized into Arrow columns per batch,
  one Parquet file at the end) on corpora of different length mixes: steady state (marginal
  rates between N and 3N rows, in process) and end to end on --e2e-rows rows, both sides as
  fresh processes (`python -m jobs.extract` and the naive loop), so start-up and imports count.
- host ceiling: the job with a nearly free model (GPT-2, d_model 8, 1 layer, 600-token
  vocabulary) at k=64 and k=1, next to the tokenizer alone on the same texts; and the same jobs
  with the forward and the reduction replaced by recorded rows (host_only): what the host side
  of a GPU run, where both run on the device, can feed it, per process.
- start-up: process start to the first batch reaching the model (the manifest's
  throughput.startup_s) of a 10-row job, against the bare imports of torch, transformers and
  accelerate; and the whole 10-row command, start to exit, beyond those imports.
- storage: the top-k rows of a 32k-vocabulary model with peaked distributions (k = 64,
  --storage-rows log-normal rows, extracted once) written in every encoding: plain float16,
  plain float32, compact, compact with top_p = 0.95 and min_k = 2. Bytes per position and per
  stored entry (and per column), the largest stored log-probability error, and the write
  (to_table, Parquet, fsync, sha256) and read (results.load_arrays) rates.

    python -m jobs.bench                       # CPU preset: T5 start mode and GPT-2 causal
    python -m jobs.bench --cases lognormal     # one corpus case (all parts still run)
    python -m jobs.bench --parts cases startup # some parts only
    python -m jobs.bench --preset gpu          # t5-base and ~1B Llama shapes, bfloat16
    python -m jobs.bench --quick               # a smoke run in well under a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lib import batching, models, sample
from lib.config import JobConfig


@dataclass
class ModelSpec:
    name: str
    family: str  # t5, gpt2 or llama
    d_model: int
    layers: int
    vocab: int
    mode: str  # start (T5) or causal
    tokenizer_vocab: int = 2000


PRESETS = {
    "cpu": [
        ModelSpec("t5-d256", "t5", 256, 4, 32128, "start"),
        ModelSpec("gpt2-d256", "gpt2", 256, 4, 32000, "causal"),
    ],
    "gpu": [
        ModelSpec("t5-base-shape", "t5", 768, 12, 32128, "start"),
        ModelSpec("llama-1b-shape", "llama", 2048, 16, 32000, "causal"),
    ],
}
TINY = {
    "t5": ModelSpec("t5-tiny", "t5", 64, 2, 32128, "start"),
    "gpt2": ModelSpec("gpt2-tiny", "gpt2", 64, 2, 32000, "causal"),
    "llama": ModelSpec("llama-tiny", "llama", 64, 2, 32000, "causal"),
}
# --quick's models: the tiny shapes with output vocabularies of 2,048 (a smoke run measures
# nothing, and 32k-entry heads were most of its time).
QUICK = {name: replace(spec, vocab=2048) for name, spec in TINY.items()}
# The nearly free model of the host ceiling: the job's own work decides its speed.
CEILING = ModelSpec("gpt2-d8", "gpt2", 8, 1, 600, "causal", tokenizer_vocab=600)

SEED = 123  # one seed for every corpus: the words (and so the tokenizers' fit) are the same


@dataclass(frozen=True)
class Case:
    about: str
    # Rows per row of the log-normal case, so that every case's N rows hold about as many
    # tokens (a log-normal row has ~71 tokens, a heavy-tail one ~150, a tiny one ~5).
    rows_factor: float


CASES = {
    "narrow": Case("word counts log-normal, sigma 0.1 around 40", 1.5),
    "lognormal": Case("word counts log-normal, sigma 0.9 around 40", 1.0),
    "heavy-tail": Case("75% short rows (sigma 0.6 around 20 words), 25% cut at max_length", 0.5),
    "tiny": Case("1-4 words a row", 15.0),
}
PARTS = ("efficiency", "cases", "ceiling", "startup", "storage")
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
# Issue 12's target: all part-* bytes within this much per stored entry plus per position.
TARGET_BYTES_PER_ENTRY, TARGET_BYTES_PER_POSITION = 2.0, 12.0


def case_texts(case: str, rows: int) -> list[str]:
    """The first `rows` texts of one corpus case (a longer call returns the same prefix)."""
    if case == "narrow":
        return sample.generate_texts(rows, SEED, mean_words=40, sigma=0.1)
    if case == "lognormal":
        return sample.generate_texts(rows, SEED, mean_words=40, sigma=0.9)
    if case == "heavy-tail":
        # ~700 words are 800+ tokens with these tokenizers: a long row is always cut at 512.
        long_rows = np.random.default_rng(SEED).random(rows) < 0.25
        short = iter(sample.generate_texts(rows, SEED, mean_words=20, sigma=0.6))
        long = iter(sample.generate_texts(int(long_rows.sum()), SEED, mean_words=700, sigma=0.1))
        return [next(long) if is_long else next(short) for is_long in long_rows]
    if case == "tiny":
        texts = sample.generate_texts(rows, SEED, mean_words=2.2, sigma=0.4)
        return [" ".join(text.split()[:4]) for text in texts]
    raise ValueError(f"unknown case {case!r}")


def write_texts(path: Path, texts: list[str]) -> str:
    """Write a Parquet corpus (`doc_id`, `text`) and return its path."""
    table = pa.table({"doc_id": [f"doc-{i:06d}" for i in range(len(texts))], "text": texts})
    pq.write_table(table, path, row_group_size=1000)
    return str(path)


def write_corpora(prefix: Path, case: str, sizes: dict[str, int]) -> dict[str, str]:
    """One corpus file per named size (`PREFIX-NAME.parquet`), each a prefix of the same texts."""
    texts = case_texts(case, max(sizes.values()))
    return {
        name: write_texts(prefix.with_name(f"{prefix.name}-{name}.parquet"), texts[:rows])
        for name, rows in sizes.items()
    }


def build_model(spec: ModelSpec, root: Path, texts: list[str]) -> str:
    """Build (once) a random-weight model of `spec` with a tokenizer trained on `texts`."""
    out = root / spec.name
    if (out / "config.json").exists():
        return str(out)
    shape = {
        "d_model": spec.d_model,
        "num_layers": spec.layers,
        "vocab_size": spec.tokenizer_vocab,
        "model_vocab_size": spec.vocab,
    }
    if spec.family == "t5":
        sample.build_t5(out, texts, **shape)
    else:
        sample.build_causal(out, texts, spec.family, **shape)
    return str(out)


def job_config(model: str, corpus: str, out: str, args, k: int | None = None) -> JobConfig:
    """The benchmark's job config; `k` overrides --k."""
    config = JobConfig()
    config.model.path, config.model.dtype = model, args.dtype
    config.input.path, config.input.max_length = corpus, args.max_length
    config.batching.max_tokens = args.max_tokens
    config.output.dir, config.output.shard_rows = out, args.shard_rows
    config.output.k = k or args.k
    return config


def run_job_timed(config: JobConfig) -> tuple[float, dict]:
    """Seconds and manifest of the job run in this process, on a clean output directory."""
    from lib.pipeline import run_job

    # A finished output would resume as a no-op (a reused --work directory): always start clean.
    shutil.rmtree(config.output.dir, ignore_errors=True)
    started = time.perf_counter()
    manifest = run_job(config, progress=False)
    return time.perf_counter() - started, manifest


def rerun_timed(config: JobConfig) -> float:
    """Seconds for the same job over its finished output: the no-op that re-hashes every shard."""
    from lib.pipeline import run_job

    started = time.perf_counter()
    manifest = run_job(config, progress=False)
    assert manifest.get("already_complete"), "the rerun recomputed a finished output"
    return time.perf_counter() - started


def fresh_python(argv: list[str]) -> str:
    """Run `python ARGV` as a fresh process and return its stdout; a failure raises."""
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"python {' '.join(argv)} exited {result.returncode}:\n{result.stderr}")
    return result.stdout


def child_seconds(argv: list[str], args) -> tuple[float, str]:
    """Wall seconds of `python ARGV` from its start to its exit, and its stdout."""
    started = time.perf_counter()
    stdout = args.run_python(argv)
    return time.perf_counter() - started, stdout


def job_process_seconds(config: JobConfig, args) -> tuple[float, dict]:
    """Wall seconds of `python -m jobs.extract` in a fresh process, and the manifest it wrote."""
    import yaml

    from lib import layout

    out = Path(config.output.dir)
    shutil.rmtree(out, ignore_errors=True)
    config_path = out.with_name(out.name + ".yaml")
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    seconds, _ = child_seconds(["-m", "jobs.extract", "--config", str(config_path)], args)
    return seconds, layout.read_manifest(out)


def corpus_tokens(model: str, corpus: str, max_length: int) -> int:
    """Input tokens of a corpus, as the job counts them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = pq.read_table(corpus, columns=["text"]).column(0).to_pylist()
    return sum(len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"])


def naive_batch_table(
    first_id: int, logits: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor | None, k: int
) -> pa.Table:
    """One batch's output rows, vectorized: a row per real position of (batch, length, vocab).

    `input_ids` (causal models) give each position's next token; None: no token (T5 start)."""
    lse = logits.logsumexp(-1)
    values, ids = logits.topk(k, -1)
    rows, positions = mask.nonzero(as_tuple=True)
    columns = {
        "id": (rows + first_id).cpu().numpy(),
        "position": positions.cpu().numpy(),
        "token_id": pa.nulls(len(rows), pa.int64()),
        "token_logprob": pa.nulls(len(rows), pa.float32()),
        "logsumexp": lse[mask].cpu().numpy(),
        "topk_ids": pa.FixedSizeListArray.from_arrays(ids[mask].cpu().numpy().ravel(), k),
        "topk_logits": pa.FixedSizeListArray.from_arrays(values[mask].cpu().numpy().ravel(), k),
    }
    if input_ids is not None:  # right padding: the last real position has no next token
        has_next = torch.zeros_like(mask)
        has_next[:, :-1] = mask[:, 1:]
        next_token = torch.zeros_like(input_ids, dtype=torch.long)
        next_token[:, :-1] = input_ids[:, 1:]
        logprob = logits.gather(-1, next_token.unsqueeze(-1)).squeeze(-1) - lse
        missing = ~has_next[mask].cpu().numpy()
        columns["token_id"] = pa.array(next_token[mask].cpu().numpy(), mask=missing)
        columns["token_logprob"] = pa.array(logprob[mask].cpu().numpy(), mask=missing)
    return pa.table(columns)


@torch.inference_mode()
def naive_loop(
    model_dir: str, corpus: str, out: str, k: int, max_length: int, device: str
) -> float:
    """The loop a careful user writes by hand; returns seconds including model loading."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    started = time.perf_counter()
    seq2seq = AutoConfig.from_pretrained(model_dir).is_encoder_decoder
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = pq.read_table(corpus, columns=["text"]).column(0).to_pylist()
    tables = []
    for first in range(0, len(texts), 32):
        enc = tok(
            texts[first : first + 32],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        if seq2seq:
            rows = enc.input_ids.shape[0]
            start = torch.full((rows, 1), model.config.decoder_start_token_id, device=device)
            logits = model(**enc, decoder_input_ids=start).logits.float()
            mask, input_ids = torch.ones((rows, 1), dtype=torch.bool, device=device), None
        else:
            logits = model(**enc).logits.float()
            mask, input_ids = enc.attention_mask.bool(), enc.input_ids
        tables.append(naive_batch_table(first, logits, mask, input_ids, k))
    pq.write_table(pa.concat_tables(tables), out)
    return time.perf_counter() - started


def _naive_settings(model: str, corpus: str, out: str, args) -> dict:
    """naive_loop's arguments, for this process or a child."""
    return {
        "model_dir": model,
        "corpus": corpus,
        "out": out,
        "k": args.k,
        "max_length": args.max_length,
        "device": args.device,
    }


def naive_seconds(model: str, corpus: str, out: str, args) -> float:
    """Seconds of the naive loop in this process, model loading included."""
    return naive_loop(**_naive_settings(model, corpus, out, args))


def naive_child(payload: str) -> None:
    """`--naive-child`: the naive loop alone in this process, for end-to-end timing."""
    naive_loop(**json.loads(payload))


def naive_process_seconds(model: str, corpus: str, out: str, args) -> float:
    """Wall seconds of the naive loop in a fresh process, imports and all."""
    payload = json.dumps(_naive_settings(model, corpus, out, args))
    return child_seconds(["-m", "jobs.bench", "--naive-child", payload], args)[0]


@torch.inference_mode()
def dense_rate(
    model_dir: str, mean_length: int, total_tokens: int, max_tokens: int, device: str, dtype: str
) -> float:
    """Tokens/s of plain forward passes on equal-length batches, no padding and no output."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from lib.models import resolve_dtype

    seq2seq = AutoConfig.from_pretrained(model_dir).is_encoder_decoder
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = (
        cls.from_pretrained(
            model_dir, dtype=resolve_dtype(dtype, torch.device(device)), attn_implementation="sdpa"
        )
        .to(device)
        .eval()
    )
    rows = max(1, max_tokens // mean_length)
    ids = torch.randint(3, 1000, (rows, mean_length), device=device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if seq2seq:
        kwargs["decoder_input_ids"] = torch.zeros((rows, 1), dtype=torch.long, device=device)
    model(**kwargs)  # warm-up
    batches = max(3, total_tokens // (rows * mean_length))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(batches):
        model(**kwargs).logits.float()
    sync()
    return batches * rows * mean_length / (time.perf_counter() - started)


@torch.inference_mode()
def model_only_seconds(lm: models.LoadedModel, corpus: str, args) -> float:
    """Seconds of the loaded model's own forward passes on exactly the job's batches of `corpus`.

    Job time over this is the pipeline's own overhead: tokenization, bucketing, the reduction,
    Arrow conversion and writing, to the extent they are not hidden behind the model.
    """
    from lib import corpus as corpus_lib

    config = job_config(lm.identity["path"], corpus, "unused", args)
    task = models.task_for(lm, config.decoder, has_targets=False)
    table = corpus_lib.read_unit(
        corpus_lib.plan_units(corpus_lib.inspect_inputs(config.input), 10**9)[0], config.input
    )
    requests = batching.tokenize_unit(
        table, lm.tokenizer, task, "", args.max_length, lm.decoder_start_token_id
    ).requests
    multiple = batching.pad_multiple_for(lm.device)  # the job's own batches
    batches = [
        batching.collate(b, lm.pad_id, multiple)
        for b in batching.make_batches(requests, args.max_tokens, multiple=multiple)
    ]
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    device = lm.device
    sync()
    started = time.perf_counter()
    for batch in batches:
        kwargs = {"input_ids": batch.input_ids.to(device)}
        if lm.is_seq2seq:  # as the job: a causal model runs unmasked (SDPA's causal kernel)
            kwargs["attention_mask"] = batch.attention_mask.to(device)
        if batch.decoder_input_ids is not None:
            kwargs["decoder_input_ids"] = batch.decoder_input_ids.to(device)
        lm.model(**kwargs, use_cache=False).logits.float()
    sync()
    return time.perf_counter() - started


def peak_rss_child(config: JobConfig, args) -> float:
    """Peak RSS (MiB) of the job run in a fresh process."""
    shutil.rmtree(config.output.dir, ignore_errors=True)
    _, stdout = child_seconds(
        ["-m", "jobs.bench", "--rss-child", json.dumps(config.to_dict())], args
    )
    return json.loads(stdout.strip().splitlines()[-1])["peak_rss_mib"]


def rss_child(payload: str) -> None:
    """`--rss-child`: run the job in this process and print its peak RSS as JSON."""
    from lib.config import load_config

    data = json.loads(payload)
    config = load_config(
        None, [f"{s}.{k}={json.dumps(v)}" for s, keys in data.items() for k, v in keys.items()]
    )
    run_job_timed(config)
    # VmHWM, not getrusage: ru_maxrss survives exec, so it would include the parent's size at fork.
    status = Path("/proc/self/status").read_text()
    if "VmHWM:" in status:
        peak_kib = int(status.split("VmHWM:")[1].split()[0])
    else:  # not Linux
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak_kib / 1024}))


def _peak_memory(spec: ModelSpec, model: str, root: Path, corpora: dict, args) -> dict:
    """Peak RSS of the job at N and 10N rows, each in a process of its own."""
    # Memory is bounded by the shard, so both runs use shards the N run can fill: with
    # 2,000-row shards the N run would hold one partial shard and never reach the steady
    # state (the widest full batches of a shard) that any longer run reaches.
    rss_args = argparse.Namespace(**{**vars(args), "shard_rows": min(args.shard_rows, args.rows)})
    rss = {
        size: peak_rss_child(
            job_config(model, corpora[size], str(root / f"rss-{spec.name}-{size}"), rss_args), args
        )
        for size in ("N", "10N")
    }
    return {
        "rss_N_mib": round(rss["N"]),
        "rss_10N_mib": round(rss["10N"]),
        "rss_ratio": round(rss["10N"] / rss["N"], 2),
    }


def _documents_cost(spec: ModelSpec, model: str, root: Path, corpus: str, args) -> dict:
    """output.level=documents (document scores, Min-K%++ moments, no top-k, no token rows)
    against today's top-k token rows on the 3N corpus: paired runs, best of two each."""
    seconds: dict[str, list[float]] = {"tokens": [], "documents": []}
    for _ in range(1 if args.quick else 2):
        for level in seconds:
            config = job_config(model, corpus, str(root / f"out-{spec.name}-{level}"), args)
            config.output.level = level
            seconds[level].append(run_job_timed(config)[0])
    tokens_s, documents_s = min(seconds["tokens"]), min(seconds["documents"])
    return {
        "tokens_level_s": round(tokens_s, 2),
        "documents_level_s": round(documents_s, 2),
        "documents_vs_tokens_time": round(documents_s / tokens_s, 3),
    }


def bench_model(spec: ModelSpec, model: str, root: Path, corpora: dict, args, full: bool) -> dict:
    """The efficiency part for one model on the log-normal corpus (RSS too when `full`)."""
    if not full and not args.quick:  # tiny models run fast: time 3N and 10N rows, or
        corpora = {**corpora, "N": corpora["3N"], "3N": corpora["10N"]}  # start-up noise swamps it
    result = {
        "model": spec.name,
        "mode": spec.mode,
        "d_model": spec.d_model,
        "layers": spec.layers,
        "vocab": spec.vocab,
    }
    tokens = {size: corpus_tokens(model, corpora[size], args.max_length) for size in ("N", "3N")}
    times = {}
    # A first run pays one-time costs (lazy imports, allocator and thread-pool warm-up) that
    # would otherwise land in the N run and inflate the marginal rate (--quick measures nothing).
    if not args.quick:
        run_job_timed(job_config(model, corpora["N"], str(root / f"out-{spec.name}-warmup"), args))
    for size in ("N", "3N"):
        times[size], manifest = run_job_timed(
            job_config(model, corpora[size], str(root / f"out-{spec.name}-{size}"), args)
        )
        result["padding_efficiency"] = manifest["throughput"]["padding_efficiency"]
    # Integrity costs: hashing the input at start, and the rerun that re-hashes every shard.
    result["input_checksum_share"] = round(
        manifest["throughput"]["input_checksum_s"] / times["3N"], 4
    )
    result["complete_rerun_s"] = round(
        rerun_timed(job_config(model, corpora["3N"], str(root / f"out-{spec.name}-3N"), args)), 3
    )
    if spec.mode == "causal":
        result.update(_documents_cost(spec, model, root, corpora["3N"], args))
    marginal = (tokens["3N"] - tokens["N"]) / (times["3N"] - times["N"])
    mean_length = max(1, round(tokens["3N"] / pq.ParquetFile(corpora["3N"]).metadata.num_rows))
    dense = dense_rate(
        model, mean_length, tokens["3N"] - tokens["N"], args.max_tokens, args.device, args.dtype
    )
    lm = models.load_model(
        job_config(model, corpora["N"], "unused", args).model, torch.device(args.device)
    )
    model_only = {size: model_only_seconds(lm, corpora[size], args) for size in ("N", "3N")}
    result.update(
        {
            "job_tok_s": round(tokens["3N"] / times["3N"]),
            "job_marginal_tok_s": round(marginal),
            "dense_tok_s": round(dense),
            "efficiency": round(marginal / dense, 3),
            "model_on_job_batches_tok_s": round(
                (tokens["3N"] - tokens["N"]) / (model_only["3N"] - model_only["N"])
            ),
            "pipeline_efficiency": round(
                (model_only["3N"] - model_only["N"]) / (times["3N"] - times["N"]), 3
            ),
        }
    )
    if full and args.rss:
        result.update(_peak_memory(spec, model, root, corpora, args))
    return result


def case_sizes(case: str, args) -> dict[str, int]:
    """Rows of a case's N, 3N and end-to-end corpora."""
    rows = max(1, round(args.case_rows * CASES[case].rows_factor))
    return {"N": rows, "3N": 3 * rows, "e2e": args.e2e_rows}


def warm_up(model: str, root: Path, args) -> None:
    """Pay the job's and the naive loop's one-time costs (lazy imports, first calls) up front."""
    corpus = write_texts(root / "corpus-warmup.parquet", case_texts("lognormal", 32))
    run_job_timed(job_config(model, corpus, str(root / "out-warmup"), args))
    naive_seconds(model, corpus, str(root / "naive-warmup.parquet"), args)


def bench_case(spec: ModelSpec, model: str, case: str, root: Path, args) -> dict:
    """The job against the naive loop on one corpus case: steady state and end to end."""
    sizes = case_sizes(case, args)
    corpora = write_corpora(root / f"corpus-{case}", case, sizes)
    tokens = {size: corpus_tokens(model, corpora[size], args.max_length) for size in corpora}
    out = f"{root}/{case}-{spec.name}"
    job, naive = {}, {}
    for size in ("N", "3N"):
        job[size], manifest = run_job_timed(job_config(model, corpora[size], f"{out}-{size}", args))
        naive[size] = naive_seconds(model, corpora[size], f"{out}-{size}-naive.parquet", args)
    added = tokens["3N"] - tokens["N"]
    job_rate, naive_rate = added / (job["3N"] - job["N"]), added / (naive["3N"] - naive["N"])
    e2e_job, _ = job_process_seconds(job_config(model, corpora["e2e"], f"{out}-e2e", args), args)
    e2e_naive = naive_process_seconds(model, corpora["e2e"], f"{out}-e2e-naive.parquet", args)
    return {
        "case": case,
        "model": spec.name,
        "rows_N": sizes["N"],
        "tokens_per_row": round(tokens["3N"] / sizes["3N"], 1),
        "padding_efficiency": manifest["throughput"]["padding_efficiency"],
        "job_marginal_tok_s": round(job_rate),
        "naive_marginal_tok_s": round(naive_rate),
        "steady_speedup": round(job_rate / naive_rate, 2),
        "e2e_rows": sizes["e2e"],
        "e2e_job_s": round(e2e_job, 2),
        "e2e_naive_s": round(e2e_naive, 2),
        "e2e_speedup": round(e2e_naive / e2e_job, 2),
    }


def host_ceiling(root: Path, training_texts: list[str], args) -> dict:
    """Job tokens/s with a nearly free model at k=64 and k=1, the same with no forward and no
    reduction (device_free), and the tokenizer alone's."""
    from transformers import AutoTokenizer

    from lib import results

    model = build_model(CEILING, root / "models", training_texts)
    tokenizer = AutoTokenizer.from_pretrained(model)
    # Enough log-normal rows for --ceiling-tokens (a row has 71 tokens or more here).
    texts = case_texts("lognormal", max(1, args.ceiling_tokens // 50))
    lengths = np.cumsum(
        [len(x) for x in tokenizer(texts, truncation=True, max_length=args.max_length).input_ids]
    )
    rows = min(len(texts), int(np.searchsorted(lengths, args.ceiling_tokens)) + 1)
    texts, tokens = texts[:rows], int(lengths[rows - 1])
    corpus = write_texts(root / "corpus-ceiling.parquet", texts)

    def tokenizer_seconds() -> float:
        started = time.perf_counter()
        tokenizer(texts, truncation=True, max_length=args.max_length)
        return time.perf_counter() - started

    result = {
        "model": CEILING.name,
        "rows": rows,
        "tokens": tokens,
        "tokenizer_tok_s": round(tokens / min(tokenizer_seconds() for _ in range(2))),
    }
    out = str(root / "out-ceiling")
    run_job_timed(job_config(model, corpus, out, args, k=64))  # warm-up
    for k in (1, 64):  # k=64 last: its rows stand in for the device's below
        best = min(run_job_timed(job_config(model, corpus, out, args, k=k))[0] for _ in range(2))
        result[f"job_k{k}_tok_s"] = round(tokens / best)
    result["job_k64_over_tokenizer"] = round(result["job_k64_tok_s"] / result["tokenizer_tok_s"], 3)
    recorded = results.load_arrays(out)
    with device_free(recorded):
        for k in (64, 1):
            runs = [run_job_timed(job_config(model, corpus, out, args, k=k)) for _ in range(2)]
            # the same rows as the real job's, or the figure would be of less work
            assert all(m["totals"]["output_rows"] == len(recorded["id"]) for _, m in runs)
            result[f"host_only_k{k}_tok_s"] = round(tokens / min(seconds for seconds, _ in runs))
    return result


@contextmanager
def device_free(recorded: dict[str, np.ndarray]) -> Iterator[None]:
    """Run jobs with the model's forward and the reduction replaced by slices of recorded rows.

    What is left is the host's share of a GPU run, where the forward and the reduction (top-k,
    logsumexp, entropy, rank) run on the device: read, tokenize, bucket, pad, collate, sort,
    build Arrow, encode and compress Parquet, hash and commit. The recorded rows are real
    output, so the columns compress as the job's own do."""
    from lib import reduce

    positions = 1 << 16  # more than a batch holds
    take = np.resize(np.arange(len(recorded["logsumexp"])), positions)
    lse = torch.from_numpy(recorded["logsumexp"][take].astype(np.float32))
    ids = torch.from_numpy(recorded["topk_ids"][take].astype(np.int32))
    logits = torch.from_numpy(recorded["topk_logits"][take].astype(np.float32))
    pool = {
        "logsumexp": lse,
        "topk_ids": ids,
        "topk_logits": logits,
        "top1_logprob": logits[:, 0] - lse,
        "token_logprob": torch.from_numpy(recorded["token_logprob"][take].astype(np.float32)),
        "token_rank": torch.from_numpy(recorded["token_rank"][take].astype(np.int32)),
        "entropy": torch.from_numpy(recorded["entropy"][take].astype(np.float32)),
    }
    start = 0

    def no_forward(lm, batch) -> torch.Tensor:
        return torch.empty((len(batch.labels), 0))

    def recorded_rows(head, states, labels, *, k, output_dtype, **_) -> dict:
        nonlocal start
        n = states.shape[0]
        start = 0 if start + n > positions else start
        part = {name: values[start : start + n] for name, values in pool.items()}
        start += n
        part["topk_ids"], part["topk_logits"] = part["topk_ids"][:, :k], part["topk_logits"][:, :k]
        part["topk_logits"] = part["topk_logits"].to(output_dtype)
        part["has_token"] = labels >= 0
        return part

    saved = models.scored_states, reduce.reduce_states
    models.scored_states, reduce.reduce_states = no_forward, recorded_rows
    try:
        yield
    finally:
        models.scored_states, reduce.reduce_states = saved


def startup(root: Path, training_texts: list[str], args) -> dict:
    """Start-up of a 10-row `python -m jobs.extract` against the bare imports, best of --repeats."""
    spec = QUICK["t5"] if args.quick else TINY["t5"]
    model = build_model(spec, root / "models", training_texts)
    corpus = write_texts(root / "corpus-startup.parquet", case_texts("lognormal", 10))
    config = job_config(model, corpus, str(root / "out-startup"), args)
    runs = [job_process_seconds(config, args) for _ in range(args.repeats)]
    imports = min(
        child_seconds(["-c", "import torch, transformers, accelerate"], args)[0]
        for _ in range(args.repeats)
    )
    startup_s = min(manifest["throughput"]["startup_s"] for _, manifest in runs)
    return {
        "model": spec.name,
        "startup_s": startup_s,
        "bare_imports_s": round(imports, 3),
        "startup_beyond_imports_s": round(startup_s - imports, 3),
        "job_10_rows_wall_s": round(min(seconds for seconds, _ in runs), 3),
        # start to exit, as a harness timing the command sees it (the run report included)
        "job_10_rows_beyond_imports_s": round(min(seconds for seconds, _ in runs) - imports, 3),
    }


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


def storage_row(name: str, settings: dict, arrays: dict, vocab: int, root: Path) -> dict:
    """One encoding of the extracted rows: bytes (per column too), error, write and read rates.

    Writing is the job's own path (writer.to_table, ShardWriter, commit: Parquet encoding,
    zstd, fsync, sha256); reading is results.load_arrays (decoded (N, k) arrays)."""
    from lib import reduce, results, writer
    from lib.layout import UNITS

    top_p = settings.get("top_p", 1.0)
    encoding = settings.get("encoding", "plain")
    dtype = settings.get("dtype", "float32")
    ids = pa.array(arrays["id"])
    schema = writer.output_schema(ids.type, STORAGE_K, vocab, dtype, full=False, encoding=encoding)
    stats = {key: arrays[key] for key in ("has_token", "token_logprob", "token_rank", "entropy")}
    stats["logsumexp"], stats["topk_ids"] = arrays["logsumexp"], arrays["topk_ids"]
    stats["topk_logits"] = arrays["topk_logits"].astype(dtype if encoding == "plain" else "float32")
    exact = arrays["topk_logits"].astype(np.float64) - arrays["logsumexp"][:, None]
    if top_p < 1:
        counts = reduce.kept_counts(
            torch.tensor(arrays["topk_logits"]),
            torch.tensor(arrays["logsumexp"]),
            top_p,
            settings["min_k"],
        )
        stats["topk_count"] = counts.numpy()
    positions = len(arrays["position"])
    out = root / f"out-storage-{name.replace(' ', '-')}"

    def write() -> float:
        shutil.rmtree(out, ignore_errors=True)
        (out / UNITS).mkdir(parents=True)
        started = time.perf_counter()
        table = writer.to_table(
            schema, ids, np.arange(positions), arrays["position"], arrays["token_id"], stats
        )
        shard = writer.ShardWriter(out, "part-00000", schema, "parquet")
        shard.write(table)
        writer.commit([shard], {}, lambda: None)
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


@contextmanager
def took(label: str) -> Iterator[None]:
    """Print how long a part of the benchmark took (to stderr), to size runs by."""
    started = time.perf_counter()
    yield
    print(f"[{label}: {time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)


def _show(part: str, result: dict) -> None:
    """Print one result as a JSON line as soon as it is measured."""
    print(json.dumps({"part": part, **result}), flush=True)


def efficiency_part(specs: list[ModelSpec], root: Path, training_texts: list[str], args) -> list:
    """The job against the model's dense rate on the log-normal corpus, per model."""
    corpora = write_corpora(
        root / "corpus-efficiency",
        "lognormal",
        {"N": args.rows, "3N": 3 * args.rows, "10N": 10 * args.rows},
    )
    tiny = [TINY["t5"], TINY["gpt2"]] if args.tiny and not args.quick else []
    rows = []
    for spec in specs + tiny:
        with took(f"efficiency {spec.name}"):
            model = build_model(spec, root / "models", training_texts)
            rows.append(bench_model(spec, model, root, corpora, args, full=spec not in tiny))
        _show("efficiency", rows[-1])
    return rows


def cases_part(specs: list[ModelSpec], root: Path, training_texts: list[str], args) -> list:
    """The job against the naive loop on every --cases corpus, per model."""
    rows = []
    for spec in specs:
        model = build_model(spec, root / "models", training_texts)
        if not args.quick:
            warm_up(model, root, args)
        for case in args.cases:
            with took(f"case {case} {spec.name}"):
                rows.append(bench_case(spec, model, case, root, args))
            _show("cases", rows[-1])
    return rows


def run_parts(specs: list[ModelSpec], root: Path, args) -> dict:
    """Every part of the benchmark that --parts selects, as JSON-ready results."""
    training_texts = case_texts("lognormal", 10 * args.rows)  # every model's tokenizer
    results = {}
    if "efficiency" in args.parts:
        results["efficiency"] = efficiency_part(specs, root, training_texts, args)
    if "cases" in args.parts:
        # --quick: one model (a smoke run; test_bench checks both naive loops' rows apart)
        results["cases"] = cases_part(
            specs[:1] if args.quick else specs, root, training_texts, args
        )
    if "ceiling" in args.parts:
        with took("host ceiling"):
            results["host_ceiling"] = host_ceiling(root, training_texts, args)
        _show("host_ceiling", results["host_ceiling"])
    if "startup" in args.parts:
        with took("start-up"):
            results["startup"] = startup(root, training_texts, args)
        _show("startup", results["startup"])
    if "storage" in args.parts:
        with took("storage"):
            results["storage"] = storage(root, training_texts, args)
        for row in results["storage"]:
            _show("storage", row)
    return results


def print_tables(results: dict) -> None:
    """The results as tables: efficiency by model, ratios by case, then ceiling and start-up."""
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 30):
        if results.get("efficiency"):
            print(pd.DataFrame(results["efficiency"]).set_index("model").T.to_string())
        if results.get("cases"):
            rows = sorted(results["cases"], key=lambda row: list(CASES).index(row["case"]))
            print(pd.DataFrame(rows).set_index(["case", "model"]).to_string())
    for part in ("host_ceiling", "startup"):
        if part in results:
            print(f"{part}: " + ", ".join(f"{k} {v}" for k, v in results[part].items()))
    if results.get("storage"):
        rows = [{k: v for k, v in row.items() if k != "columns"} for row in results["storage"]]
        columns = {row["encoding"]: row["columns"] for row in results["storage"]}
        figure = lambda v: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"  # noqa: E731
        with pd.option_context("display.width", 250, "display.max_columns", 30):
            print(pd.DataFrame(rows).set_index("encoding").T.to_string(float_format=figure))
            print("bytes per position, by column:")
            print(pd.DataFrame(columns).to_string(na_rep=""))


def print_settings(root: Path, args) -> None:
    """What this run measures on, and the sizes of its parts."""
    where = (
        torch.cuda.get_device_name()
        if torch.device(args.device).type == "cuda"
        else f"{os.cpu_count()} CPU cores"
    )
    print(
        f"device {args.device} ({where}), torch {torch.__version__}, max_tokens={args.max_tokens}, "
        f"k={args.k}, max_length={args.max_length}, work dir {root}"
    )
    if "efficiency" in args.parts:
        print(f"efficiency: N={args.rows} log-normal rows")
    if "storage" in args.parts:
        print(f"storage: {args.storage_rows} log-normal rows, k={STORAGE_K}, {STORAGE.name}")
    if "cases" in args.parts:
        print(
            f"cases: N rows, about as many tokens in each case (fewer than the efficiency "
            f"part's N, to fit the time budget); end to end: {args.e2e_rows} rows, new processes"
        )
        for case in args.cases:
            print(f"  {case}: {CASES[case].about}, N={case_sizes(case, args)['N']}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--cases", nargs="+", choices=list(CASES), help="default: all (lognormal with --quick)"
    )
    parser.add_argument(
        "--rows", type=int, default=400, help="N of the efficiency part (3N and 10N follow)"
    )
    parser.add_argument(
        "--case-rows",
        type=int,
        default=200,
        help="N of the log-normal case in the case matrix (other cases: about as many tokens)",
    )
    parser.add_argument("--e2e-rows", type=int, default=1200)
    parser.add_argument("--ceiling-tokens", type=int, default=500_000)
    parser.add_argument(
        "--storage-rows", type=int, default=300, help="log-normal rows of the storage part"
    )
    parser.add_argument("--repeats", type=int, default=3, help="start-up runs (best of)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="batching.max_tokens (default: the job's for the device, 65536 with --preset gpu)",
    )
    parser.add_argument("--shard-rows", type=int, default=2000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-rss", dest="rss", action="store_false")
    parser.add_argument("--no-tiny", dest="tiny", action="store_false")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke run, not a measurement"
    )
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--naive-child", default=None, help=argparse.SUPPRESS)
    return parser


def main(
    argv: list[str] | None = None, run_python: Callable[[list[str]], str] = fresh_python
) -> int:
    """The benchmark. `run_python(argv)` runs `python ARGV` (the tests' uses a fork server)."""
    args = _parser().parse_args(argv)
    args.run_python = run_python  # how child_seconds starts every child process
    logging.basicConfig(level=logging.ERROR)
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    if args.naive_child:
        naive_child(args.naive_child)
        return 0
    specs = PRESETS[args.preset]
    if args.max_tokens is None:  # the job's own default on this device; 65536 for the GPU shapes
        default = batching.max_tokens_for(None, torch.device(args.device))
        args.max_tokens = 65536 if args.preset == "gpu" else default
    if args.quick:
        args.rows, args.case_rows, args.e2e_rows, args.max_length = 20, 10, 30, 64
        args.storage_rows = 20
        args.rss, args.ceiling_tokens, args.repeats = False, 5000, 1
        args.cases = args.cases or ["lognormal"]
        specs = [QUICK["t5"], QUICK["gpt2"]]
    args.cases = args.cases or list(CASES)
    root = Path(args.work or tempfile.mkdtemp(prefix="logit-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print_settings(root, args)
    results = run_parts(specs, root, args)
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
