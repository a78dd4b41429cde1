"""`python -m jobs.verify`: `logit-extract verify` (check an output directory)."""

from __future__ import annotations

import sys

from lib import cli


def main(argv: list[str] | None = None) -> int:
    """The command's exit status."""
    argv = sys.argv[1:] if argv is None else argv
    return cli.run("verify", argv, prog="python -m jobs.verify")


if __name__ == "__main__":
    sys.exit(main())
