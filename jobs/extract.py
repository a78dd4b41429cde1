"""Extract per-token logits: `python -m jobs.extract --config FILE [section.key=value ...]`.

Exit status: 0 done, 2 refused (config, input or output directory), 1 the output could not be
written (disk full, permissions) or the host ran out of memory, 130 and 143 stopped by SIGINT and
SIGTERM (rerun to resume).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading

import yaml

from lib.config import describe_keys, load_config
from lib.errors import (
    HostMemoryError,
    Interrupted,
    OutputError,
    UserError,
    first_line,
    one_line,
)
from lib.inspect.summary import print_summary


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a UserError like any other, not usage text plus a line."""

    def error(self, message: str) -> None:
        raise UserError(f"{message} (usage: {self.prog} --config FILE [section.key=value ...])")


def _on_signal(signum: int, frame) -> None:
    # Further signals while the job cleans up are ignored; SIGKILL still works.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def _committed(out_dir: str, level: str) -> int:
    """Shards committed so far in the level's first folder (one per committed unit)."""
    from lib import storage
    from lib.output import layout

    folder = layout.folders(level)[0]
    try:
        return len(layout.shard_files(storage.location(out_dir), folder))
    except (OSError, UserError):
        return 0


def main(argv: list[str] | None = None) -> int:
    """Run the job a config describes; returns the exit status."""
    parser = _Parser(
        prog="python -m jobs.extract",
        description=__doc__,
        epilog="config keys (section.key, default, choices):\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the job's info logs")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    config = None
    try:
        args = parser.parse_args(argv)
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
            f"{_committed(config.output.dir, config.output.level)} shards committed in "
            f"{config.output.dir}; "
            if config
            else ""
        )
        print(f"stopped by {name}: {where}run the same command to resume", file=sys.stderr)
        return 128 + stop.signum
    except (OutputError, HostMemoryError) as exc:
        print("error: " + one_line(str(exc)), file=sys.stderr)
        return 1
    except MemoryError:  # outside a batch: tokenizing or writing a unit
        print(
            "error: out of host memory; lower batching.max_tokens or output.shard_rows and run "
            "the same command to resume",
            file=sys.stderr,
        )
        return 1
    except UserError as exc:
        print("error: " + one_line(str(exc)), file=sys.stderr)
        return 2
    except OSError as exc:  # an I/O failure outside the writer's own handling
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or first_line(exc)}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if done is not None:
        print_summary(done.manifest, config.output.dir, already_complete=done.already_complete)
        if config.output.report:
            _write_report(config.output.dir, rewrite=not done.already_complete)
    return 0


def _write_report(out_dir: str, rewrite: bool) -> None:
    """OUT/report.html (see jobs.report); a rerun that changed nothing keeps one drawn after
    the job finished. A finished job never fails for its report: a failure is a warning."""
    from lib import storage
    from lib.output import layout

    if os.environ.get("LOGIT_EXTRACT_NO_REPORT"):
        return  # the test suite's runs skip drawing (a second or two each)
    path = storage.location(out_dir) / layout.REPORT
    try:
        if not rewrite and path.exists():
            # not newer than _SUCCESS: drawn (by jobs.report) while the job ran, marked partial
            finished = (storage.location(out_dir) / layout.SUCCESS).stat().st_mtime
            if path.stat().st_mtime > finished:
                return
        from lib.inspect.report import write_report

        write_report(out_dir)
    except Exception as exc:
        print(f"warning: no report written: {one_line(first_line(exc))}", file=sys.stderr)
        return
    print(f"  {'report':<20}{path}")


if __name__ == "__main__":
    status = main()
    # The interpreter's last garbage collection walks every object that torch, transformers and
    # the model left (1.0-1.1 s of a 10-row job's 4.9 s here, against 0.16 s frozen). The job
    # is over and its files closed, so nothing of ours waits on that collection.
    gc.freeze()
    sys.exit(status)
