"""`python -m jobs.export OUT DEST`: `logit-extract export` (a plain-encoded copy)."""

from __future__ import annotations

import sys

from lib import cli


def main(argv: list[str] | None = None) -> int:
    """The command's exit status."""
    argv = sys.argv[1:] if argv is None else argv
    return cli.run("export", argv, prog="python -m jobs.export")


if __name__ == "__main__":
    sys.exit(main())
