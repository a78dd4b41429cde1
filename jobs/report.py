"""Draw a run: `python -m jobs.report OUT [--output FILE] [--png FILE]`.

Writes one self-contained HTML page (inline PNG figures, no scripts, no links) to
OUT/report.html or FILE: the run's rows, lengths, batching, throughput, the model's
log-probabilities, ranks, stored top-k mass and calibration. A directory whose job has not
finished is drawn from its committed shards and marked partial. `--png` also draws every
figure into one image (the README's screenshot). Exit status: 0 written, 2 not an output
directory, 1 the output could not be read or the report could not be written.
"""

from __future__ import annotations

import argparse
import sys

from lib.errors import OutputError, UserError, one_line
from lib.inspect import report
from lib.storage import explain


def main(argv: list[str] | None = None) -> int:
    """Write the report; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m jobs.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", help="the job's output.dir")
    parser.add_argument("--output", help="the HTML file to write (default: OUT/report.html)")
    parser.add_argument("--png", help="also draw every figure into this PNG file")
    args = parser.parse_args(argv)
    try:
        path, drawn = report.write_report(args.out_dir, args.output, args.png)
    except OutputError as exc:
        print("error: " + one_line(str(exc)), file=sys.stderr)
        return 1
    except UserError as exc:
        print("error: " + one_line(str(exc)), file=sys.stderr)
        return 2
    except OSError as exc:  # a store that cannot be reached, listed or read
        print(f"error: {args.out_dir}: {one_line(explain(exc))}", file=sys.stderr)
        return 1
    figures = sum(len(panel.draws) > 0 for panel in drawn.panels)
    state = "partial output, " if drawn.info.partial else ""
    print(f"wrote {path} ({state}{figures} figures)")
    if args.png:
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
