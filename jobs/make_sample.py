"""`python -m jobs.make_sample`: `logit-extract sample` (build the offline sample)."""

from __future__ import annotations

import sys

from lib import cli


def main(argv: list[str] | None = None) -> int:
    """The command's exit status."""
    argv = sys.argv[1:] if argv is None else argv
    return cli.run("sample", argv, prog="python -m jobs.make_sample")


if __name__ == "__main__":
    sys.exit(main())
