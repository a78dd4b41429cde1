"""The cases part: the job against the naive loop on corpora of different length mixes."""

from __future__ import annotations

from pathlib import Path

from lib.bench.baselines import corpus_tokens, naive_process_seconds, naive_seconds
from lib.bench.runs import job_config, job_process_seconds, run_job_timed, show, took
from lib.bench.workloads import (
    ModelSpec,
    build_model,
    case_sizes,
    case_texts,
    write_corpora,
    write_texts,
)


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
        "padding_efficiency": manifest.throughput["padding_efficiency"],
        "job_marginal_tok_s": round(job_rate),
        "naive_marginal_tok_s": round(naive_rate),
        "steady_speedup": round(job_rate / naive_rate, 2),
        "e2e_rows": sizes["e2e"],
        "e2e_job_s": round(e2e_job, 2),
        "e2e_naive_s": round(e2e_naive, 2),
        "e2e_speedup": round(e2e_naive / e2e_job, 2),
    }


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
            show("cases", rows[-1])
    return rows
