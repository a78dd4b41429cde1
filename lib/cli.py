"""The command line, `logit-extract COMMAND [...]` (HELP), and the one place errors become exit
statuses. `python -m jobs.extract` and the other `jobs/` modules are the same commands."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from lib.errors import HostMemoryError, Interrupted, OutputError, UserError, one_line

HELP = """usage: logit-extract COMMAND [...]

commands:
  extract   run the job: --config FILE [section.key=value ...]
  verify    check an output directory: OUT [--input [PATH]]
  report    draw the run report: OUT [--output FILE] [--png FILE]
  export    write a plain-encoded copy of a compact or top-p output: OUT DEST
  bench     benchmark the job (make bench)
  sample    build the offline sample [DIR]

`logit-extract COMMAND --help` gives a command's options. Exit status: 0 done; 2 refused (a
config, input, model or output location that cannot be used); 1 failed (the output could not be
written or read, the host ran out of memory); 130 and 143 stopped by SIGINT and SIGTERM (run
the same command to resume). Every error is one `error:` line."""

COMMANDS = {  # name -> the module with its `add_arguments(parser)` and `run(args) -> int`
    "extract": "lib.commands.extract",
    "verify": "lib.commands.verify",
    "report": "lib.commands.report",
    "export": "lib.commands.export",
    "bench": "lib.bench.command",
    "sample": "lib.commands.sample",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a UserError like any other, not usage text plus a line."""

    def error(self, message: str) -> None:
        usage = self.format_usage().strip().removeprefix("usage: ")
        raise UserError(f"{message} (usage: {' '.join(usage.split())})")


def error_line(exc: BaseException) -> tuple[str, int]:
    """What the user sees for an exception a command did not handle, and the exit status."""
    if isinstance(exc, OutputError | HostMemoryError):
        return one_line(str(exc)), 1
    if isinstance(exc, UserError):
        return one_line(str(exc)), 2
    if isinstance(exc, MemoryError):
        return "out of host memory", 1
    from lib.storage import explain

    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    cause = exc.strerror if getattr(exc, "strerror", None) else explain(exc)
    return f"{where}{one_line(cause)}", 1


def run(command: str, argv: list[str], prog: str) -> int:
    """Run one command; its errors become one line on stderr and an exit status."""
    module = importlib.import_module(COMMANDS[command])
    parser = Parser(
        prog=prog,
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    try:
        return module.run(parser.parse_args(argv))
    except Interrupted as stop:
        print(f"stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    except (UserError, OSError, MemoryError) as exc:
        line, status = error_line(exc)
        print(f"error: {line}", file=sys.stderr)
        return status


def main(argv: list[str] | None = None) -> int:
    """`logit-extract COMMAND [...]`; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"error: unknown command {command!r}; commands are {names}", file=sys.stderr)
        return 2
    return run(command, rest, f"logit-extract {command}")
