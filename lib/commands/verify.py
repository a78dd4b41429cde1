"""Check an output directory: `logit-extract verify OUT [--input [PATH] [--id-column COL]]`.

Prints one line per problem and exits 1, or prints one OK line and exits 0 (a warning line for a
temporary a dead writer left); a path that does not exist, is a file or is a location nothing
reads is one `error:` line, exit 2. `--input` also checks that every input id is scored or
skipped, exactly once; without a PATH it takes the input path and id column from the manifest.
"""

from __future__ import annotations

import argparse
import sys

from lib.inspect.verify import Report, verify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """OUT, --input and --id-column."""
    parser.add_argument("out_dir", help="the job's output.dir")
    parser.add_argument(
        "--input",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="input Parquet file, directory or glob (default: the manifest's input.path)",
    )
    parser.add_argument(
        "--id-column",
        default=None,
        help="input id column (default: the manifest's input.id_column)",
    )


def run(args: argparse.Namespace) -> int:
    """Check the output directory; returns the exit status."""
    report = verify(
        args.out_dir,
        input_path=args.input or None,
        id_column=args.id_column,
        check_input=args.input is not None or args.id_column is not None,
    )
    for warning in report.warnings:
        print(f"warning: {args.out_dir}: {warning}", file=sys.stderr)
    for problem in report.problems:
        print(f"{args.out_dir}: {problem}", file=sys.stderr)
    if report.problems:
        return 1
    print(f"OK {args.out_dir}: {_figures(report)}")
    return 0


def _figures(report: Report) -> str:
    """Shards, rows, input ids and what the top-k costs, as the OK line gives them."""
    checked = (
        f", {report.input_rows:,} input ids accounted for" if report.input_rows is not None else ""
    )
    storage = ""
    if report.storage:  # compact or top_p output: what its top-k costs on disk
        s = report.storage
        storage = (
            f"; {s.bytes_per_position:.1f} bytes/position, {s.bytes_per_entry:.2f} "
            f"bytes/entry ({s.entries_per_position:.1f} top-k entries/position)"
        )
    if report.document_rows is None:
        rows = f"{report.output_rows:,} rows"
    elif report.output_rows:
        rows = f"{report.output_rows:,} token rows and {report.document_rows:,} document rows"
    else:
        rows = f"{report.document_rows:,} document rows"
    return f"{report.shards} shards, {rows}{checked}{storage}"
