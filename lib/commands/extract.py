"""Extract per-token logits: `logit-extract extract --config FILE [section.key=value ...]`.

Exit status: 0 done, 2 refused (config, input or output directory), 1 the output could not be
written (disk full, permissions) or the host ran out of memory, 130 and 143 stopped by SIGINT and
SIGTERM (rerun to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

import yaml

from lib.config import JobConfig, describe_keys, load_config
from lib.errors import HostMemoryError, Interrupted, UserError, first_line, one_line
from lib.inspect.summary import print_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, the overrides, --print-config and -v."""
    parser.usage = "%(prog)s --config FILE [section.key=value ...]"
    parser.epilog = "config keys (section.key, default, choices):\n" + describe_keys()
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the job's info logs")


def _on_signal(signum: int, frame) -> None:
    # Further signals while the job cleans up are ignored; SIGKILL still works.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_stop_the_job() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted (in the main thread), then the old handlers return."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _committed(config: JobConfig) -> int:
    """Shards committed so far in the level's first folder (one per committed unit)."""
    from lib import storage
    from lib.output import layout

    folder = layout.folders(config.output.level)[0]
    try:
        return len(layout.shard_files(storage.location(config.output.dir), folder))
    except (OSError, UserError):
        return 0


def run(args: argparse.Namespace) -> int:
    """Run the job a config describes; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = None
    with _signals_stop_the_job():
        try:
            config = load_config(args.config, args.overrides)
            if args.print_config:
                print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
                return 0
            if args.verbose:
                logging.getLogger("lib").setLevel(logging.INFO)
            from lib.job import run_job  # torch and transformers load only for a valid config

            done = run_job(config)
        except Interrupted as stop:
            name = signal.Signals(stop.signum).name
            where = (
                f"{_committed(config)} shards committed in {config.output.dir}; " if config else ""
            )
            print(f"stopped by {name}: {where}run the same command to resume", file=sys.stderr)
            return 128 + stop.signum
        except MemoryError:  # outside a batch: tokenizing or writing a unit
            raise HostMemoryError(
                "out of host memory; lower batching.max_tokens or output.shard_rows and run the "
                "same command to resume"
            ) from None
    if done is not None:
        print_summary(done.manifest, config.output.dir, already_complete=done.already_complete)
        if config.output.report:
            _write_report(config.output.dir, rewrite=not done.already_complete)
    return 0


def _write_report(out_dir: str, rewrite: bool) -> None:
    """OUT/_report.html (see `logit-extract report`); a rerun that changed nothing keeps one drawn
    after the job finished. A finished job never fails for its report: a failure is a warning."""
    from lib import storage
    from lib.output import layout

    if os.environ.get("LOGIT_EXTRACT_NO_REPORT"):
        return  # the test suite's runs skip drawing (a second or two each)
    path = storage.location(out_dir) / layout.REPORT
    try:
        if not rewrite and path.exists():
            # not newer than _SUCCESS: drawn (by the report command) while the job ran, partial
            finished = (storage.location(out_dir) / layout.SUCCESS).stat().st_mtime
            if path.stat().st_mtime > finished:
                return
        from lib.inspect.report import write_report

        write_report(out_dir)
    except Exception as exc:
        print(f"warning: no report written: {one_line(first_line(exc))}", file=sys.stderr)
        return
    print(f"  {'report':<20}{path}")
