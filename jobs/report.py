"""`python -m jobs.report`: `logit-extract report` (draw the run report)."""

from __future__ import annotations

import sys

from lib import cli


def main(argv: list[str] | None = None) -> int:
    """The command's exit status."""
    argv = sys.argv[1:] if argv is None else argv
    return cli.run("report", argv, prog="python -m jobs.report")


if __name__ == "__main__":
    sys.exit(main())
