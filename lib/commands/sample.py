"""Build the offline sample that `make extract` reads: `logit-extract sample [DIR]`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """DIR."""
    parser.add_argument("folder", nargs="?", default="data/sample", help="default: data/sample")


def run(args: argparse.Namespace) -> int:
    """Build the sample corpus and models; returns the exit status."""
    from lib.sample import build_default_sample

    info = build_default_sample(args.folder)
    print(
        f"sample corpus {info['corpus']}, model {info['model']}, "
        f"causal model {info['causal_model']}"
    )
    return 0
