"""Write a plain-encoded copy of a finished top-k output: `logit-extract export OUT DEST`.

DEST gets the same layout with each token row's kept top-k entries as two ordinary list
columns, `topk_ids` and `topk_logprobs`, readable by any Parquet or Arrow client without this
project (compact shards need lib.results to decode their ids); document and skipped rows are
copied, and DEST has a manifest of its own that `logit-extract verify` checks. Exit status:
0 written, 2 nothing to export (no finished output, no top-k rows) or DEST not empty, 1 the
copy could not be written.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """OUT and DEST."""
    parser.add_argument("out_dir", help="a finished job's output.dir (compact or top-p output)")
    parser.add_argument("dest", help="a new, or empty, directory for the copy")


def run(args: argparse.Namespace) -> int:
    """Export; returns the exit status."""
    from lib.output.export import export

    manifest = export(args.out_dir, args.dest)
    tokens = manifest.totals.output_rows
    print(f"wrote {args.dest}: {len(manifest.shards)} shards, {tokens:,} token rows, plain top-k")
    return 0
