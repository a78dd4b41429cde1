"""Timed runs of the job, in this process or a fresh one, and the progress lines."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lib.config import JobConfig
from lib.output.records import Manifest


def job_config(model: str, corpus: str, out: str, args, k: int | None = None) -> JobConfig:
    """The benchmark's job config; `k` overrides --k."""
    config = JobConfig()
    config.model.path, config.model.dtype = model, args.dtype
    config.input.path, config.input.max_length = corpus, args.max_length
    config.batching.max_tokens = args.max_tokens
    config.output.dir, config.output.shard_rows = out, args.shard_rows
    config.output.k = k or args.k
    return config


def run_job_timed(config: JobConfig) -> tuple[float, Manifest]:
    """Seconds and manifest of the job run in this process, on a clean output directory."""
    from lib.job import run_job

    # A finished output would resume as a no-op (a reused --work directory): always start clean.
    shutil.rmtree(config.output.dir, ignore_errors=True)
    started = time.perf_counter()
    done = run_job(config, progress=False)
    return time.perf_counter() - started, done.manifest


def rerun_timed(config: JobConfig) -> float:
    """Seconds for the same job over its finished output: the no-op that re-hashes every shard."""
    from lib.job import run_job

    started = time.perf_counter()
    done = run_job(config, progress=False)
    assert done.already_complete, "the rerun recomputed a finished output"
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

    from lib.output import layout

    out = Path(config.output.dir)
    shutil.rmtree(out, ignore_errors=True)
    config_path = out.with_name(out.name + ".yaml")
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    seconds, _ = child_seconds(["-m", "jobs.extract", "--config", str(config_path)], args)
    return seconds, layout.read_manifest(out)


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


@contextmanager
def took(label: str) -> Iterator[None]:
    """Print how long a part of the benchmark took (to stderr), to size runs by."""
    started = time.perf_counter()
    yield
    print(f"[{label}: {time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)


def show(part: str, result: dict) -> None:
    """Print one result as a JSON line as soon as it is measured."""
    print(json.dumps({"part": part, **result}), flush=True)
