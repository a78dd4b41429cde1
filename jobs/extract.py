"""Extract per-token logits: `python -m jobs.extract --config FILE [section.key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from lib.config import load_config
from lib.errors import UserError
from lib.summary import print_summary


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a UserError like any other, not usage text plus a line."""

    def error(self, message: str) -> None:
        raise UserError(f"{message} (usage: {self.prog} --config FILE [section.key=value ...])")


def one_line(error: UserError) -> str:
    """The message as a single `error: ...` line, however the text was built."""
    return "error: " + re.sub(r"\s*[\r\n]+\s*", " ", str(error).strip())


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m jobs.extract", description=__doc__)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parser.parse_args(argv)
        config = load_config(args.config, args.overrides)
        from lib.pipeline import run_job  # torch and transformers load only for a valid config

        manifest = run_job(config)
    except UserError as exc:
        print(one_line(exc), file=sys.stderr)
        return 2
    if manifest:
        print_summary(manifest, config.output.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
