"""Draw a run: `logit-extract report OUT [--output FILE] [--png FILE]`.

Writes one self-contained HTML page (inline PNG figures, no scripts, no links) to
OUT/_report.html or FILE: the run's rows, lengths, batching, throughput, the model's
log-probabilities, ranks, stored top-k mass and calibration. A directory whose job has not
finished is drawn from its committed shards and marked partial. `--png` also draws every
figure into one image (the README's screenshot). Exit status: 0 written, 2 not an output
directory, 1 the output could not be read or the report could not be written.
"""

from __future__ import annotations

import argparse

from lib.inspect import report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """OUT, --output and --png."""
    parser.add_argument("out_dir", help="the job's output.dir")
    parser.add_argument("--output", help="the HTML file to write (default: OUT/_report.html)")
    parser.add_argument("--png", help="also draw every figure into this PNG file")


def run(args: argparse.Namespace) -> int:
    """Write the report; returns the exit status."""
    path, drawn = report.write_report(args.out_dir, args.output, args.png)
    figures = sum(len(panel.draws) > 0 for panel in drawn.panels)
    state = "partial output, " if drawn.info.partial else ""
    print(f"wrote {path} ({state}{figures} figures)")
    if args.png:
        print(f"wrote {args.png}")
    return 0
