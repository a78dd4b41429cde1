"""The short report printed at the end of a run."""

from __future__ import annotations


def print_summary(manifest: dict, out_dir: str) -> None:
    """Rows, tokens, padding efficiency, throughput, wall time and where the output is."""
    totals = manifest["totals"]
    run = manifest.get("this_run", {})
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
                f"{run.get('rows', 0):,} rows in {run.get('units', 0)} units, "
                f"{manifest.get('world_size', 1)} process(es)",
            ),
            ("tokens (main rank)", f"{run.get('main_process_tokens', 0):,}"),
            ("padding efficiency", f"{run.get('padding_efficiency', 0):.1%}"),
            ("throughput", f"{run.get('tokens_per_s', 0):,.0f} tokens/s"),
            ("wall time", f"{run.get('wall_s', 0):.1f} s"),
        ]
    lines.append(("output", out_dir))
    print("\n".join(f"  {label:<20}{value}" for label, value in lines))
