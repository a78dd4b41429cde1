"""Benchmark the job against the naive loop and the model's dense-batch speed: `make bench`.

For each model, in one process and on the same machine, it measures
  (a) the naive loop users write: 32 rows a batch in input order, padded to the longest,
      float32, top-k with per-row Python output, one Parquet file at the end;
  (b) the job (lib.pipeline.run_job), on N and 3N rows, so start-up cancels in the marginal rate;
  (c) the model's dense throughput: equal-length batches of the corpus's mean length, same budget;
and prints tokens/s, job/naive (steady state and end to end), efficiency = marginal job rate / (c),
padding efficiency, and peak RSS of the job at N and 10N rows (separate processes). It also
times the model's forward passes alone on exactly the job's batches: pipeline_efficiency is that
time over the job's, so it shows what the pipeline adds; efficiency also includes what the length
mix itself costs the model (attention on the long tail) against equal-length batches.
`--tiny` adds the same efficiency for a d_model 64, 2-layer model, where the pipeline's own costs show.
Integrity costs: input_checksum_share is the part of the 3N job spent hashing its input files,
complete_rerun_s the time of a rerun over the finished 3N output (which re-hashes every shard).

    python -m jobs.bench                       # CPU preset: T5 start mode and GPT-2 causal
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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch

from lib import sample
from lib.config import JobConfig


@dataclass
class ModelSpec:
    name: str
    family: str  # t5, gpt2 or llama
    d_model: int
    layers: int
    vocab: int
    mode: str  # start (T5) or causal


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


def build_model(spec: ModelSpec, root: Path, texts: list[str]) -> str:
    out = root / spec.name
    if (out / "config.json").exists():
        return str(out)
    if spec.family == "t5":
        sample.build_t5(
            out,
            texts,
            d_model=spec.d_model,
            num_layers=spec.layers,
            vocab_size=2000,
            model_vocab_size=spec.vocab,
        )
    else:
        sample.build_causal(
            out,
            texts,
            spec.family,
            d_model=spec.d_model,
            num_layers=spec.layers,
            vocab_size=2000,
            model_vocab_size=spec.vocab,
        )
    return str(out)


def job_config(model: str, corpus: str, out: str, args) -> JobConfig:
    config = JobConfig()
    config.model.path, config.model.dtype = model, args.dtype
    config.input.path, config.input.max_length = corpus, args.max_length
    config.batching.max_tokens = args.max_tokens
    config.output.dir, config.output.k, config.output.shard_rows = out, args.k, args.shard_rows
    return config


def run_job_timed(config: JobConfig) -> tuple[float, dict]:
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


def corpus_tokens(model: str, corpus: str, max_length: int) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = pq.read_table(corpus, columns=["text"]).column(0).to_pylist()
    return sum(len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"])


@torch.inference_mode()
def naive_loop(
    model_dir: str, corpus: str, out: str, k: int, max_length: int, device: str
) -> float:
    """What users write by hand; returns seconds including model loading."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    started = time.perf_counter()
    seq2seq = AutoConfig.from_pretrained(model_dir).is_encoder_decoder
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = pq.read_table(corpus, columns=["text"]).column(0).to_pylist()
    records = []
    for i in range(0, len(texts), 32):
        enc = tok(
            texts[i : i + 32],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        if seq2seq:
            start = torch.full(
                (enc.input_ids.shape[0], 1), model.config.decoder_start_token_id, device=device
            )
            logits = model(**enc, decoder_input_ids=start).logits.float()
        else:
            logits = model(**enc).logits.float()
        lse = logits.logsumexp(-1)
        values, ids = logits.topk(k, -1)
        logprobs = logits.log_softmax(-1)
        for b in range(logits.shape[0]):
            length = 1 if seq2seq else int(enc.attention_mask[b].sum())
            for p in range(length):
                token = None if seq2seq or p + 1 >= length else int(enc.input_ids[b, p + 1])
                records.append(
                    {
                        "id": i + b,
                        "position": p,
                        "token_id": token,
                        "token_logprob": None if token is None else float(logprobs[b, p, token]),
                        "logsumexp": float(lse[b, p]),
                        "topk_ids": ids[b, p].tolist(),
                        "topk_logits": values[b, p].tolist(),
                    }
                )
    pd.DataFrame(records).to_parquet(out)
    return time.perf_counter() - started


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
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(batches):
        model(**kwargs).logits.float()
    sync()
    return batches * rows * mean_length / (time.perf_counter() - started)


@torch.inference_mode()
def model_only_seconds(model_dir: str, corpus: str, args) -> float:
    """Seconds of the model's own forward passes on exactly the job's batches of `corpus`.

    Job time over this is the pipeline's own overhead: tokenization, bucketing, the reduction,
    Arrow conversion and writing, to the extent they are not hidden behind the model.
    """
    from lib import batching, models
    from lib import corpus as corpus_lib

    config = job_config(model_dir, corpus, "unused", args)
    lm = models.load_model(config.model, torch.device(args.device))
    task = models.task_for(lm, config.decoder, has_targets=False)
    table = corpus_lib.read_unit(
        corpus_lib.plan_units(corpus_lib.inspect_inputs(config.input), 10**9)[0], config.input
    )
    requests = batching.tokenize_unit(
        table, lm.tokenizer, task, "", args.max_length, lm.decoder_start_token_id
    ).requests
    batches = [
        batching.collate(b, lm.pad_id) for b in batching.make_batches(requests, args.max_tokens)
    ]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    device = lm.device
    sync()
    started = time.perf_counter()
    for batch in batches:
        kwargs = {
            "input_ids": batch.input_ids.to(device),
            "attention_mask": batch.attention_mask.to(device),
        }
        if batch.decoder_input_ids is not None:
            kwargs["decoder_input_ids"] = batch.decoder_input_ids.to(device)
        lm.model(**kwargs, use_cache=False).logits.float()
    sync()
    return time.perf_counter() - started


def peak_rss_child(config: JobConfig) -> float:
    """Peak RSS (MiB) of the job run in a fresh process."""
    payload = json.dumps(config.to_dict())
    shutil.rmtree(config.output.dir, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-m", "jobs.bench", "--rss-child", payload],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def rss_child(payload: str) -> None:
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


def _against_naive(
    spec, model: str, root: Path, corpora: dict, tokens: dict, marginal: float, args
) -> dict:
    """The naive loop's rates on N and 3N rows, and (T5) both end to end on the e2e corpus."""
    naive = {
        size: naive_loop(
            model,
            corpora[size],
            str(root / f"naive-{spec.name}-{size}.parquet"),
            args.k,
            args.max_length,
            args.device,
        )
        for size in ("N", "3N")
    }
    naive_marginal = (tokens["3N"] - tokens["N"]) / (naive["3N"] - naive["N"])
    result = {
        "naive_tok_s": round(tokens["3N"] / naive["3N"]),
        "naive_marginal_tok_s": round(naive_marginal),
        "steady_speedup": round(marginal / naive_marginal, 2),
    }
    if spec.family == "t5":
        job_s, _ = run_job_timed(
            job_config(model, corpora["e2e"], str(root / f"out-{spec.name}-e2e"), args)
        )
        naive_s = naive_loop(
            model,
            corpora["e2e"],
            str(root / f"naive-{spec.name}-e2e.parquet"),
            args.k,
            args.max_length,
            args.device,
        )
        result.update(
            {
                "e2e_rows": args.e2e_rows,
                "e2e_job_s": round(job_s, 2),
                "e2e_naive_s": round(naive_s, 2),
                "e2e_speedup": round(naive_s / job_s, 2),
            }
        )
    return result


def _peak_memory(spec, model: str, root: Path, corpora: dict, args) -> dict:
    """Peak RSS of the job at N and 10N rows, each in a process of its own."""
    # Memory is bounded by the shard, so both runs use shards the N run can fill: with
    # 2,000-row shards the N run would hold one partial shard and never reach the steady
    # state (the widest full batches of a shard) that any longer run reaches.
    rss_args = argparse.Namespace(**{**vars(args), "shard_rows": min(args.shard_rows, args.rows)})
    rss = {
        size: peak_rss_child(
            job_config(model, corpora[size], str(root / f"rss-{spec.name}-{size}"), rss_args)
        )
        for size in ("N", "10N")
    }
    return {
        "rss_N_mib": round(rss["N"]),
        "rss_10N_mib": round(rss["10N"]),
        "rss_ratio": round(rss["10N"] / rss["N"], 2),
    }


def bench_model(spec: ModelSpec, root: Path, corpora: dict[str, str], args, full: bool) -> dict:
    if (
        not full
    ):  # tiny models run fast: time 3N and 10N rows, or start-up noise swamps the difference
        corpora = {**corpora, "N": corpora["3N"], "3N": corpora["10N"]}
    texts = pq.read_table(corpora["10N"], columns=["text"]).column(0).to_pylist()
    model = build_model(spec, root / "models", texts)
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
    # would otherwise land in the N run and inflate the marginal rate.
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
    marginal = (tokens["3N"] - tokens["N"]) / (times["3N"] - times["N"])
    mean_length = max(1, round(tokens["3N"] / pq.ParquetFile(corpora["3N"]).metadata.num_rows))
    dense = dense_rate(
        model, mean_length, tokens["3N"] - tokens["N"], args.max_tokens, args.device, args.dtype
    )
    model_only = {size: model_only_seconds(model, corpora[size], args) for size in ("N", "3N")}
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
    if full:
        result.update(_against_naive(spec, model, root, corpora, tokens, marginal, args))
        if args.rss:
            result.update(_peak_memory(spec, model, root, corpora, args))
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument(
        "--rows", type=int, default=400, help="N: rows of the small run (3N and 10N follow)"
    )
    parser.add_argument("--e2e-rows", type=int, default=1200)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="batching.max_tokens (default 16384, 65536 with --preset gpu)",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    specs = PRESETS[args.preset]
    if args.max_tokens is None:
        args.max_tokens = 65536 if args.preset == "gpu" else 16384
    if args.quick:
        args.rows, args.e2e_rows, args.rss, args.max_length = 20, 30, False, 64
        specs = [TINY["t5"], TINY["gpt2"]]
    root = Path(args.work or tempfile.mkdtemp(prefix="logit-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    corpora = {}
    full_corpus = sample.write_corpus(
        root / "corpus-10N.parquet",
        rows=10 * args.rows,
        seed=123,
        mean_words=40,
        with_targets=False,
    )
    table = pq.read_table(full_corpus)
    for name, rows in (
        ("N", args.rows),
        ("3N", 3 * args.rows),
        ("10N", 10 * args.rows),
        ("e2e", min(args.e2e_rows, 10 * args.rows)),
    ):
        path = root / f"corpus-{name}.parquet"
        pq.write_table(table.slice(0, rows), path)
        corpora[name] = str(path)
    print(
        f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{os.cpu_count()} CPU cores'}), "
        f"torch {torch.__version__}, N={args.rows}, max_tokens={args.max_tokens}, k={args.k}, work dir {root}"
    )
    results = []
    for spec in specs:
        results.append(bench_model(spec, root, corpora, args, full=True))
        print(json.dumps(results[-1]), flush=True)
    if args.tiny and not args.quick:
        for spec in (TINY["t5"], TINY["gpt2"]):
            results.append(bench_model(spec, root, corpora, args, full=False))
            print(json.dumps(results[-1]), flush=True)
    frame = pd.DataFrame(results).set_index("model")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(frame.T.to_string())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
