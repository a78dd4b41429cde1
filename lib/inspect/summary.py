"""The short report printed at the end of a run."""

from __future__ import annotations

from lib.output.records import Manifest


def _count(n: int, one: str, many: str | None = None) -> str:
    """`1 shard`, `2 shards`."""
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def _figure(value: float) -> str:
    """Three significant digits below 100, whole numbers above: 12.3, 1,002."""
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def _output_rows(manifest: Manifest) -> str:
    totals, shards = manifest.totals, _count(len(manifest.shards), "shard")
    level = manifest.config.output.level
    if level == "tokens":
        return f"{totals.output_rows:,} in {shards}"
    if level == "documents":
        return f"{totals.document_rows:,} document rows in {shards}"
    return (
        f"{totals.output_rows:,} token rows and {totals.document_rows:,} document rows in {shards}"
    )


def _capped(manifest: Manifest) -> str | None:
    """With output.top_p: a line when most token rows kept all k entries (the mass they hold
    stays below top_p, and output.k, not top_p, decided what was stored)."""
    output, totals = manifest.config.output, manifest.totals
    if output.top_p >= 1 or totals.topk_capped is None or not totals.output_rows:
        return None
    share = totals.topk_capped / totals.output_rows
    if share < 0.5:
        return None
    return (
        f"{share:.0%} of positions kept all {output.k} entries without reaching "
        f"top_p={output.top_p:g}: output.k caps it (raise output.k to store that mass)"
    )


def print_summary(manifest: Manifest, out_dir: str, *, already_complete: bool = False) -> None:
    """Rows, tokens, padding efficiency, throughput, wall time, the corpus scores and where
    the output is."""
    totals = manifest.totals
    run = manifest.throughput
    if already_complete:
        print(f"already complete: {out_dir} (nothing rewritten)")
    lines = [
        (
            "rows",
            f"{totals.input_rows:,} input = {totals.scored_rows:,} scored "
            f"+ {totals.skipped_rows:,} skipped ({totals.truncated_rows:,} truncated)",
        ),
        ("output rows", _output_rows(manifest)),
    ]
    if not already_complete:
        lines += [
            (
                "this run",
                f"{run['rows']:,} rows in {_count(run['units'], 'unit')}, "
                f"{_count(manifest.world_size, 'process', 'processes')}",
            ),
            ("tokens", f"{run['tokens']:,} ({run['padded_tokens']:,} padded)"),
            ("padding efficiency", f"{run['padding_efficiency']:.1%}"),
            ("throughput", f"{run['tokens_per_s']:,.0f} tokens/s, {run['rows_per_s']:,.1f} rows/s"),
            ("wall time", f"{run['wall_s']:.1f} s"),
        ]
    scores = manifest.scores
    if scores.get("tokens"):
        bits = scores.get("bits_per_byte")
        text = f"{scores['tokens']:,} tokens scored: perplexity {_figure(scores['perplexity'])}"
        if bits is not None:
            text += f", {bits:.3f} bits/byte"
        # A model scoring its own greedy tokens is its own top-1: the figures say nothing
        # (unless its generation config steers decoding away from the raw top-1).
        generate = manifest.config.decoder.mode == "generate"
        if not generate or scores["top1_accuracy"] < 1:
            text += f", top-1 {scores['top1_accuracy']:.1%}, ECE {scores['ece']:.3f}"
        lines.append(("scores", text))
    capped = _capped(manifest)
    if capped:
        lines.append(("top-p", capped))
    if manifest.recomputed:
        names, count = ", ".join(manifest.recomputed), len(manifest.recomputed)
        what = "shard" if count == 1 else "shards"
        lines.append(("recomputed", f"{count} {what} damaged, missing or unrecorded: {names}"))
    lines.append(("output", out_dir))
    print("\n".join(f"  {label:<20}{value}" for label, value in lines))
