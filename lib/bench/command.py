"""Benchmark the job against the naive loop and the model's dense-batch speed: `make bench`
(`logit-extract bench`).

Six parts, on the same machine and models (each a module of lib/bench/):

- efficiency (log-normal corpus, N = --rows): the job (lib.job.run_job) on N and 3N rows,
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
- teacher: the causal model's job on 3N rows with each teacher column (2 probes, 2
  temperatures, 12 and 64 samples, all) against the same job without: time and bytes per
  position, paired runs, best of two.

    logit-extract bench                       # CPU preset: T5 start mode and GPT-2 causal
    logit-extract bench --cases lognormal     # one corpus case (all parts still run)
    logit-extract bench --parts cases startup # some parts only
    logit-extract bench --preset gpu          # t5-base and ~1B Llama shapes, bfloat16
    logit-extract bench --quick               # a smoke run in well under a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lib.bench import encodings, host
from lib.bench.baselines import naive_child
from lib.bench.cases import cases_part
from lib.bench.efficiency import efficiency_part
from lib.bench.encodings import STORAGE, STORAGE_K
from lib.bench.runs import fresh_python, rss_child, show, took
from lib.bench.teacher import teacher_part
from lib.bench.workloads import CASES, PRESETS, QUICK, ModelSpec, case_sizes, case_texts
from lib.extract import batching

PARTS = ("efficiency", "cases", "ceiling", "startup", "storage", "teacher")


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
            results["host_ceiling"] = host.host_ceiling(root, training_texts, args)
        show("host_ceiling", results["host_ceiling"])
    if "startup" in args.parts:
        with took("start-up"):
            results["startup"] = host.startup(root, training_texts, args)
        show("startup", results["startup"])
    if "storage" in args.parts:
        with took("storage"):
            results["storage"] = encodings.storage(root, training_texts, args)
        for row in results["storage"]:
            show("storage", row)
    if "teacher" in args.parts:
        results["teacher"] = teacher_part(specs, root, training_texts, args)
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
    if results.get("teacher"):
        with pd.option_context("display.width", 250, "display.max_columns", 30):
            print(pd.DataFrame(results["teacher"]).set_index("setting").to_string())
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The parts, sizes and settings of a run."""
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


def run(args: argparse.Namespace) -> int:
    """The benchmark, its children started as fresh processes."""
    return benchmark(args, fresh_python)


def benchmark(args: argparse.Namespace, run_python: Callable[[list[str]], str]) -> int:
    """The benchmark. `run_python(argv)` runs `python ARGV` (the tests' uses a fork server)."""
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
