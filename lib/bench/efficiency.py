"""The efficiency part: the job's marginal rate against the model's dense rate, the pipeline's
share, integrity costs and peak memory."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
import torch

from lib.bench.baselines import corpus_tokens, dense_rate, model_only_seconds
from lib.bench.runs import job_config, peak_rss_child, rerun_timed, run_job_timed, show, took
from lib.bench.workloads import TINY, ModelSpec, build_model, write_corpora
from lib.extract import models


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
        result["padding_efficiency"] = manifest.throughput["padding_efficiency"]
    # Integrity costs: hashing the input at start, and the rerun that re-hashes every shard.
    result["input_checksum_share"] = round(manifest.throughput["input_checksum_s"] / times["3N"], 4)
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
        show("efficiency", rows[-1])
    return rows
