"""Extract per-token logits: `python -m jobs.extract --config FILE [section.key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys

from lib.config import load_config
from lib.errors import UserError
from lib.summary import print_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.extract", description=__doc__)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        from lib.pipeline import run_job  # torch and transformers load only for a valid config

        manifest = run_job(config)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if manifest:
        print_summary(manifest, config.output.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
