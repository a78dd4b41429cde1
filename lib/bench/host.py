"""The host's own costs: the ceiling with a nearly free model (and with no forward at all), and
start-up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lib.bench.runs import child_seconds, job_config, job_process_seconds, run_job_timed
from lib.bench.workloads import CEILING, QUICK, TINY, build_model, case_texts, write_texts
from lib.extract import models


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
            assert all(m.totals.output_rows == len(recorded["id"]) for _, m in runs)
            result[f"host_only_k{k}_tok_s"] = round(tokens / min(seconds for seconds, _ in runs))
    return result


@contextmanager
def device_free(recorded: dict[str, np.ndarray]) -> Iterator[None]:
    """Run jobs with the model's forward and the reduction replaced by slices of recorded rows.

    What is left is the host's share of a GPU run, where the forward and the reduction (top-k,
    logsumexp, entropy, rank) run on the device: read, tokenize, bucket, pad, collate, sort,
    build Arrow, encode and compress Parquet, hash and commit. The recorded rows are real
    output, so the columns compress as the job's own do."""
    from lib.extract import reduce

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

    def recorded_rows(head, states, labels, spec, **_) -> dict:
        nonlocal start
        n = states.shape[0]
        start = 0 if start + n > positions else start
        part = {name: values[start : start + n] for name, values in pool.items()}
        start += n
        k = spec.k
        part["topk_ids"], part["topk_logits"] = part["topk_ids"][:, :k], part["topk_logits"][:, :k]
        part["topk_logits"] = part["topk_logits"].to(spec.output_dtype)
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
    startup_s = min(manifest.throughput["startup_s"] for _, manifest in runs)
    return {
        "model": spec.name,
        "startup_s": startup_s,
        "bare_imports_s": round(imports, 3),
        "startup_beyond_imports_s": round(startup_s - imports, 3),
        "job_10_rows_wall_s": round(min(seconds for seconds, _ in runs), 3),
        # start to exit, as a harness timing the command sees it (the run report included)
        "job_10_rows_beyond_imports_s": round(min(seconds for seconds, _ in runs) - imports, 3),
    }
