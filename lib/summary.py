"""The short report printed at the end of a run."""

from __future__ import annotations


def print_summary(manifest: dict, out_dir: str) -> None:
    """Rows, tokens, padding efficiency, throughput, wall time and where the output is."""
    totals = manifest["totals"]
    run = manifest["throughput"]
    if manifest.get("already_complete"):
        print(f"already complete: {out_dir} (nothing rewritten)")
    lines = [
        (
            "rows",
            f"{totals['input_rows']:,} input = {totals['scored_rows']:,} scored "
            f"+ {totals['skipped_rows']:,} skipped ({totals['truncated_rows']:,} truncated)",
        ),
        ("output rows", f"{totals['output_rows']:,} in {len(manifest['shards'])} shards"),
    ]
    if not manifest.get("already_complete"):
        lines += [
            (
                "this run",
                f"{run['rows']:,} rows in {run['units']} units, "
                f"{manifest.get('world_size', 1)} process(es)",
            ),
            ("tokens", f"{run['tokens']:,} ({run['padded_tokens']:,} padded)"),
            ("padding efficiency", f"{run['padding_efficiency']:.1%}"),
            ("throughput", f"{run['tokens_per_s']:,.0f} tokens/s, {run['rows_per_s']:,.1f} rows/s"),
            ("wall time", f"{run['wall_s']:.1f} s"),
        ]
    if manifest.get("recomputed"):
        names = ", ".join(manifest["recomputed"])
        lines.append(
            (
                "recomputed",
                f"{len(manifest['recomputed'])} shards that failed their checksum: {names}",
            )
        )
    lines.append(("output", out_dir))
    print("\n".join(f"  {label:<20}{value}" for label, value in lines))
