"""The report's figures: each panel is a figure with a one-line caption saying how to read it,
and its numbers beside it, drawn from what lib/inspect/run_stats.py aggregates."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from lib.inspect.run_stats import (
    MASS_BINS,
    Calibration,
    Histogram,
    RunInfo,
    TokenStats,
    timing,
    totals,
    unit_rates,
)

MAX_POINTS = 4000  # scatter points drawn; more are thinned evenly
_PALETTE = ("#3b6ea8", "#d1793a", "#4f9a5d", "#b04a5a", "#7b62a8", "#8c6d3f", "#3aa0a8")
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "axes.titley": 1.0,
}


# -- figures -----------------------------------------------------------------------------------
Draw = Callable[[Axes], None]


@dataclass
class Panel:
    """One figure of the report: its title, a one-line caption, the numbers beside it, and a
    drawing function per axes."""

    key: str
    title: str
    caption: str
    numbers: list[tuple[str, str, str]]  # (key, label, value)
    draws: list[Draw]
    height: float = 3.4  # inches


def _count(n: float) -> str:
    """A whole number with thousands separators."""
    return f"{int(n):,}"


def _share(part: float, whole: float) -> str:
    """`part` as a percentage of `whole`."""
    return f"{part / whole:.1%}" if whole else "n/a"


def _num(value: float | None, digits: int = 3) -> str:
    """`digits` significant digits, or a whole number with thousands separators when larger."""
    if value is None or not math.isfinite(value):
        return "n/a"
    # '#' keeps trailing zeros so that figures in one table line up (4.260, not 4.26).
    return f"{value:,.0f}" if abs(value) >= 10**digits else f"{value:#.{digits}g}"


def _empty(message: str) -> Draw:
    """A drawing that is only a message, for a figure with nothing to show."""

    def draw(ax: Axes) -> None:
        ax.set_axis_off()
        ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, color="#666")

    return draw


def _missing(info: RunInfo, what: str) -> Draw:
    """The drawing that stands for figures the unit records have no data for."""
    source = info.manifest.exported_from if info.manifest is not None else None
    if not info.records and source:
        return _empty(f"an export keeps no unit records:\nsee the report of {source}")
    if not info.records:
        return _empty("no unit is committed yet")
    return _empty(f"the unit records carry no {what}\n(written by an older version of the job)")


def counts_axis(ax: Axes, which: str = "y") -> None:
    """A linear axis of counts ticks whole numbers only (no 0.5 rows)."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_locator(MaxNLocator(integer=True))


def log_axis(ax: Axes, which: str = "x") -> None:
    """A log axis with readable labels: decades over a wide range, 1-2-5 steps over a narrow one."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    # Under two decades the decade ticks alone leave one label or none on the axis.
    narrow = lo > 0 and hi / lo < 100
    axis.set_major_locator(
        LogLocator(base=10, subs=(1.0, 2.0, 5.0) if narrow else (1.0,), numticks=8)
    )
    axis.set_major_formatter(FuncFormatter(_plain_tick))
    axis.set_minor_formatter(NullFormatter())


def _plain_tick(value: float, _pos: int | None = None) -> str:
    """A log-axis tick as a plain number: 0.01, 200, 5k, 2M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _bars(hist: Histogram, title: str, xlabel: str, transform=None, log_y: bool = False) -> Draw:
    """A drawing of a histogram's bins (edges through `transform`, e.g. 10**x)."""

    def draw(ax: Axes) -> None:
        if not hist.n:
            return _empty("no values")(ax)
        edges = hist.edges if transform is None else transform(hist.edges)
        used = np.flatnonzero(hist.counts)
        lo, hi = used[0], used[-1] + 1
        ax.stairs(hist.counts[lo:hi], edges[lo : hi + 1], fill=True, color=_PALETTE[0])
        if transform is not None:
            ax.set_xscale("log")
            log_axis(ax, "x")
        if log_y:
            ax.set_yscale("log")
            log_axis(ax, "y")
        else:
            counts_axis(ax)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")

    return draw


def run_panel(info: RunInfo) -> Panel:
    """Rows scored, truncated and skipped (by reason), with the run's headline numbers."""
    total, run = totals(info), timing(info)
    parts = [("scored, complete", total.scored_rows - total.truncated_rows)]
    parts.append(("scored, truncated", total.truncated_rows))
    parts += [(f"skipped: {reason}", n) for reason, n in sorted(info.skipped.items())]

    def draw(ax: Axes) -> None:
        left = 0
        for i, (label, n) in enumerate(parts):
            ax.barh(
                [0], [n], left=left, color=_PALETTE[i % len(_PALETTE)], label=f"{label} ({n:,})"
            )
            left += n
        # the legend goes under the bar, inside the axes: the figure's fixed margins would cut
        # a legend beside it, as they cut its labels
        ax.set_ylim(-1.6, 0.5)
        ax.set_yticks([])
        ax.spines["left"].set_visible(False)
        counts_axis(ax, "x")
        ax.set_xlabel("input rows")
        ax.set_title("input rows by outcome")
        ax.legend(loc="lower center", ncol=min(3, len(parts)), frameon=False, fontsize=8)

    numbers = [
        ("input_rows", "input rows", _count(total.input_rows)),
        ("scored_rows", "scored", _count(total.scored_rows)),
        ("skipped_rows", "skipped", _count(total.skipped_rows)),
        *[
            (f"skipped_{reason}", f"skipped: {reason}", _count(n))
            for reason, n in sorted(info.skipped.items())
        ],
        ("truncated_rows", "truncated", _count(total.truncated_rows)),
        ("output_rows", "output rows", _count(total.output_rows)),
        ("tokens", "tokens" + (" (this run)" if info.manifest else ""), _count(run.tokens)),
        ("padded_tokens", "padded tokens", _count(run.padded_tokens)),
        ("wall_s", "wall time", f"{_num(run.wall_s, 4)} s"),
        ("tokens_per_s", "tokens/s", _num(run.tokens_per_s, 4)),
        ("processes", "processes", str(run.processes)),
    ]
    if info.records or not info.manifest or not info.manifest.exported_from:
        numbers.append(("units", "units committed", _count(len(info.records))))
    if info.records and info.manifest and total.shard_tokens != run.tokens:  # a resumed run
        numbers.append(("shard_tokens", "tokens (all shards)", _count(total.shard_tokens)))
    caption = "Every input row is scored (complete or cut at input.max_length) or skipped."
    return Panel("run", "The run", caption, numbers, [draw], height=2.0)


def lengths_panel(info: RunInfo) -> Panel:
    """Histogram of tokenized lengths (texts, and targets) from the unit records."""
    max_length = info.config.input.max_length
    kinds = {}
    for kind in ("text", "target"):
        found = [r.lengths[kind] for r in info.records if kind in r.lengths]
        if found:
            width = found[0]["bin_width"]
            size = max(len(f["counts"]) for f in found)
            counts = np.zeros(size, np.int64)
            for f in (f for f in found if f["bin_width"] == width):
                counts[: len(f["counts"])] += f["counts"]
            kinds[kind] = (width, counts)
    total = totals(info)
    numbers = [
        ("max_length", "input.max_length", str(max_length)),
        ("truncated_rows", "truncated rows", _count(total.truncated_rows)),
        (
            "truncated_share",
            "truncated share",
            _share(total.truncated_rows, total.scored_rows),
        ),
    ]
    for kind, (width, counts) in kinds.items():
        mean = (counts * (np.arange(len(counts)) + 0.5) * width).sum() / max(counts.sum(), 1)
        numbers.append((f"mean_{kind}_length", f"mean {kind} length (binned)", _num(mean)))
    caption = (
        "Tokenized lengths of the scored rows; the dashed line is input.max_length, "
        "and rows in its bin were (mostly) cut there."
    )
    if not kinds:
        draws = [_missing(info, "length histograms")]
    else:
        draws = [_lengths_draw(kinds, max_length)]
    return Panel("lengths", "Input lengths", caption, numbers, draws)


def _lengths_draw(kinds: dict, max_length: int | None) -> Draw:
    """Length histograms as steps, with input.max_length marked."""

    def draw(ax: Axes) -> None:
        for i, (kind, (width, counts)) in enumerate(kinds.items()):
            edges = np.arange(len(counts) + 1) * width
            ax.stairs(counts, edges, fill=i == 0, alpha=0.8, color=_PALETTE[i], label=kind)
        if max_length:
            ax.axvline(max_length, color="#b04a5a", ls="--", lw=1, label="input.max_length")
        counts_axis(ax)
        ax.set_title("tokenized lengths of scored rows")
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
        ax.legend(frameon=False)

    return draw


def batching_panel(info: RunInfo) -> Panel:
    """Padding efficiency per batch, and padded width against rows per batch."""
    batches = np.array([b for r in info.records for b in r.batches], dtype=np.float64)
    caption = (
        "Left: real over padded tokens per forward batch (1 = no padding). Right: each batch's "
        "padded width against its rows; the dashed curve is the batching.max_tokens budget."
    )
    if not len(batches):
        draws = [_missing(info, "batch sizes")]
        return Panel("batching", "Batching", caption, [], draws)
    rows, real, padded = batches[:, 0], batches[:, 1], batches[:, 2]
    efficiency = real / np.maximum(padded, 1)
    width = padded / np.maximum(rows, 1)
    max_tokens = info.config.batching.max_tokens
    numbers = [
        ("batches", "batches", _count(len(batches))),
        ("padding_efficiency", "padding efficiency", _share(real.sum(), padded.sum())),
        ("median_batch_efficiency", "median per batch", f"{np.median(efficiency):.1%}"),
        ("median_rows", "median rows per batch", _num(float(np.median(rows)))),
        ("median_width", "median padded width", _num(float(np.median(width)))),
    ]
    eff = Histogram(40, 0.0, 1.0)
    eff.add(efficiency)
    step = max(1, len(batches) // MAX_POINTS)

    def scatter(ax: Axes) -> None:
        size = 24 if len(batches) < 200 else 6
        ax.scatter(width[::step], rows[::step], s=size, alpha=0.5, color=_PALETTE[0], lw=0)
        if max_tokens:
            grid = np.linspace(max(width.min(), 1), width.max() * 1.05, 200)
            ax.plot(grid, max_tokens / grid, ls="--", color=_PALETTE[3], lw=1, label="max_tokens")
            ax.set_ylim(0, rows.max() * 1.1)
            ax.legend(frameon=False)
        counts_axis(ax)
        ax.set_title("padded width against rows per batch")
        ax.set_xlabel("padded tokens per row")
        ax.set_ylabel("rows in batch")

    draws = [_bars(eff, "padding efficiency per batch", "real / padded tokens"), scatter]
    return Panel("batching", "Batching", caption, numbers, draws)


def throughput_panel(info: RunInfo) -> Panel:
    """Tokens/s per committed unit against time, one line per rank."""
    lines = unit_rates(info.records)
    run = timing(info)
    caption = (
        "Tokens/s of each committed unit at its commit time, one line per rank; "
        "a dip is a stall, a flat line a steady run (dashed: the whole run with its start-up)."
    )
    if not lines:
        draws = [_missing(info, "timestamps")]
        return Panel("throughput", "Throughput over the run", caption, [], draws)
    rates = np.concatenate([points[:, 1] for points in lines.values()])
    numbers = [
        ("tokens_per_s", "tokens/s (run)", _num(run.tokens_per_s, 4)),
        ("units_timed", "units timed", _count(len(rates))),
        ("ranks", "ranks", str(len({rank for rank, _ in lines}))),
        ("unit_rate_min", "slowest unit, tokens/s", _num(float(rates.min()), 4)),
        ("unit_rate_median", "median unit, tokens/s", _num(float(np.median(rates)), 4)),
        ("unit_rate_max", "fastest unit, tokens/s", _num(float(rates.max()), 4)),
    ]
    few = len(rates) < 4  # a line through one or two points says little: a bar per unit
    draw = _unit_bars(lines, run.tokens_per_s) if few else _rate_lines(lines, run.tokens_per_s)
    return Panel("throughput", "Throughput over the run", caption, numbers, [draw])


def _rate_lines(lines: dict, overall: float) -> Draw:
    """Tokens/s of each unit against its commit time, a line per rank (and run)."""
    runs = list(dict.fromkeys(run_id for _, run_id in lines))

    def draw(ax: Axes) -> None:
        for (rank, run_id), points in sorted(lines.items()):
            label = f"rank {rank}" + (f", run {runs.index(run_id) + 1}" if len(runs) > 1 else "")
            style = ("-", "--", ":", "-.")[runs.index(run_id) % 4]
            color = _PALETTE[rank % len(_PALETTE)]
            ax.plot(
                points[:, 0], points[:, 1], marker="o", ms=3, ls=style, color=color, label=label
            )
        if math.isfinite(overall):
            ax.axhline(overall, color="#666", ls="--", lw=1, label="overall")
        ax.set_ylim(bottom=0)
        ax.set_title("tokens/s per committed unit")
        ax.set_xlabel("seconds since the first unit started")
        ax.set_ylabel("tokens/s")
        ax.legend(frameon=False, fontsize=8)

    return draw


def _unit_bars(lines: dict, overall: float) -> Draw:
    """Tokens/s of each unit as a bar of its own, labelled (a run of few units)."""
    units = sorted(
        (float(t), float(rate), rank) for (rank, _), points in lines.items() for t, rate in points
    )

    def draw(ax: Axes) -> None:
        labels = [f"unit {i + 1}\n(rank {rank})" for i, (_, _, rank) in enumerate(units)]
        rates = [rate for _, rate, _ in units]
        bars = ax.bar(range(len(units)), rates, color=_PALETTE[0], width=0.5)
        ax.bar_label(bars, labels=[f"{rate:,.0f}" for rate in rates], padding=2)
        if math.isfinite(overall):
            ax.axhline(overall, color="#666", ls="--", lw=1, label="overall")
            ax.legend(frameon=False, fontsize=8, loc="lower right")
        ax.set_xticks(range(len(units)), labels)
        ax.set_xlim(-0.75, len(units) - 0.25)
        ax.set_ylim(0, max(rates + [overall if math.isfinite(overall) else 0]) * 1.2)
        ax.set_title("tokens/s per committed unit")
        ax.set_ylabel("tokens/s")

    return draw


def _rank_labels(bins: int) -> list[str]:
    """Tick labels: the lowest rank of each bin (0, 1, 2, 4, ... 1k)."""

    def short(n: int) -> str:
        return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}k" if n >= 1 << 10 else str(n)

    return ["0"] + [short(1 << (j - 1)) for j in range(1, bins)]


def token_panels(stats: TokenStats) -> list[Panel]:
    """Log-probability, rank, entropy and stored mass of the token rows."""
    scored = stats.scored
    mean = stats.logprob.mean
    numbers = [
        ("positions", "positions", _count(stats.positions)),
        ("positions_with_token", "with an actual token", _count(scored)),
        ("mean_logprob", "mean log-probability", _num(mean, 4)),
        ("perplexity", "perplexity exp(-mean)", _num(math.exp(-mean) if scored else math.nan, 4)),
        ("top1_accuracy", "top-1 is the token", _share(stats.top1, scored)),
    ]
    none = _empty("no position has an actual token\n(e.g. decoder.mode=start)")
    logprob = _bars(stats.logprob, "token log-probability", "log p(actual token)")
    panels = [
        Panel(
            "logprob",
            "Token log-probability",
            "How likely the model found each actual token: mass near 0 is confident and right, "
            "a long left tail is surprise.",
            numbers,
            [logprob if scored else none],
        ),
        Panel(
            "rank",
            "Token rank",
            "How many tokens the model ranked above the actual one, in bins doubling in width "
            "(log scale): 0 means the actual token was the top-1.",
            [
                ("rank_0", "rank 0", _share(stats.rank[0], scored)),
                ("rank_lt_8", "rank below 8", _share(stats.rank[:4].sum(), scored)),
                ("rank_ge_1024", "rank 1,024 or more", _share(stats.rank[11:].sum(), scored)),
            ],
            [_rank_draw(stats.rank) if scored else none],
        ),
    ]
    if stats.entropy is not None:
        panels.append(_entropy_panel(stats.entropy))
    if stats.mass is not None:
        panels.append(_mass_panel(stats.mass))
    if stats.probes:
        panels.append(_probes_panel(stats.probes))
    return panels


def _probes_panel(probes: dict[str, Histogram]) -> Panel:
    """The probability of each probe token (output.probes) at every row, one line each."""
    numbers = [
        (f"probe_{i}", f"mean p({name!r})", _num(hist.mean, 3))
        for i, (name, hist) in enumerate(probes.items())
    ]

    def draw(ax: Axes) -> None:
        for i, (name, hist) in enumerate(list(probes.items())[: len(_PALETTE)]):
            ax.stairs(hist.counts, hist.edges, color=_PALETTE[i], label=repr(name), linewidth=1.4)
        ax.set_yscale("log")
        log_axis(ax, "y")
        ax.legend(frameon=False)
        ax.set_title("probe probabilities")
        ax.set_xlabel("probability of the probe token")
        ax.set_ylabel("rows")

    caption = (
        "The probability of each probe token (output.probes) at every row: a yes/no pair that "
        "separates the rows piles up near 0 and 1; one that does not, in the middle."
    )
    return Panel("probes", "Probes", caption, numbers, [draw])


def _rank_draw(counts: np.ndarray) -> Draw:
    """Bars of the rank bins up to the last one used, on a log count scale."""

    def draw(ax: Axes) -> None:
        used = int(np.flatnonzero(counts).max()) + 1 if counts.any() else 1
        ax.bar(np.arange(used), counts[:used], width=0.85, color=_PALETTE[0])
        ax.set_xticks(np.arange(used), _rank_labels(used), rotation=45 if used > 8 else 0)
        ax.set_yscale("log")
        log_axis(ax, "y")
        ax.set_title("token rank")
        ax.set_xlabel("rank (bins from this value up to the next)")
        ax.set_ylabel("positions")

    return draw


def _entropy_panel(hist: Histogram) -> Panel:
    """Histogram of the entropy per position."""
    numbers = [
        ("mean_entropy", "mean entropy (nats)", _num(hist.mean, 4)),
        ("median_entropy", "median entropy (nats)", _num(hist.quantile(0.5), 4)),
    ]
    caption = (
        "Entropy of the model's next-token distribution per position: near 0 the model is "
        "sure of one token, near ln(vocabulary) it has no idea."
    )
    draw = _bars(hist, "entropy per position", "entropy (nats)")
    return Panel("entropy", "Entropy", caption, numbers, [draw])


def _mass_panel(hist: Histogram) -> Panel:
    """Histogram of the probability mass the stored top-k holds per position."""
    below = hist.counts[: int(0.9 * MASS_BINS)].sum()
    numbers = [
        ("mean_mass", "mean stored mass", _num(hist.mean, 4)),
        ("mass_below_0.9", "positions below 0.9", _share(below, hist.n)),
        (
            "mass_below_0.5",
            "positions below 0.5",
            _share(hist.counts[: MASS_BINS // 2].sum(), hist.n),
        ),
    ]
    caption = (
        "Probability the stored top-k holds per position, sum(exp(topk_logits - logsumexp)): "
        "near 1 means k was large enough; a left tail means raise output.k."
    )
    draw = _bars(hist, "stored top-k probability mass", "sum of top-k probabilities", log_y=True)
    return Panel("mass", "Stored top-k mass", caption, numbers, [draw])


def calibration_panel(calibration: Calibration) -> Panel:
    """Reliability diagram (top-1 confidence against accuracy) and the ECE."""
    counts = calibration.counts
    total = counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        confidence = calibration.confidence / counts
        accuracy = calibration.correct / counts
    numbers = [
        ("ece", "ECE (15 bins)", _num(calibration.ece, 3)),
        ("calibration_positions", "positions", _count(total)),
        ("mean_confidence", "mean top-1 probability", _share(calibration.confidence.sum(), total)),
        ("accuracy", "top-1 accuracy", _share(calibration.correct.sum(), total)),
        ("calibration_source", "computed from", calibration.source),
    ]
    caption = (
        "Bars: how often the top-1 token was the actual one, per bin of its probability; dots: "
        "the bin's mean probability. Bars up to their dots (the diagonal) are calibrated, bars "
        "below them overconfident; ECE weighs the gaps by bin size."
    )
    if not total:
        draws = [_empty("no position has an actual token")]
        return Panel("calibration", "Calibration", caption, numbers, draws)
    edges = np.linspace(0, 1, len(counts) + 1)
    used = counts > 0

    def reliability(ax: Axes) -> None:
        ax.plot([0, 1], [0, 1], ls="--", color="#888", lw=1, label="calibrated")
        ax.bar(
            edges[:-1][used],
            accuracy[used],
            width=1 / len(counts),
            align="edge",
            color=_PALETTE[0],
            alpha=0.8,
            edgecolor="white",
            label="accuracy",
        )
        # each bin's mean confidence over its own bar: the gap to the bar top is its error
        centers = edges[:-1][used] + 0.5 / len(counts)
        ax.vlines(centers, accuracy[used], confidence[used], color=_PALETTE[1], lw=1)
        ax.plot(centers, confidence[used], "o", color=_PALETTE[1], ms=4, label="mean confidence")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            title=f"reliability (ECE {calibration.ece:.3f})",
            xlabel="top-1 probability",
            ylabel="top-1 accuracy",
        )
        ax.legend(frameon=False, loc="upper left")

    def spread(ax: Axes) -> None:
        ax.stairs(counts, edges, fill=True, color=_PALETTE[2])
        ax.set_yscale("log")
        log_axis(ax, "y")
        ax.set(title="positions per confidence bin", xlabel="top-1 probability", ylabel="positions")

    return Panel("calibration", "Calibration", caption, numbers, [reliability, spread])


def documents_panel(hists: dict[str, Histogram]) -> Panel:
    """Histograms of perplexity, bits per byte and Min-K%++ per document."""
    draws, numbers = [], []
    labels = {  # name: (short name, title, x label)
        "perplexity": ("perplexity", "perplexity per document", "perplexity (log scale)"),
        "bits_per_byte": ("bits per byte", "bits per byte", "bits per UTF-8 byte"),
        "min_k_plus_plus": ("Min-K%++", "Min-K%++ per document", "Min-K%++ score"),
    }
    for name, hist in hists.items():
        short, title, xlabel = labels[name]
        transform = (lambda x: 10.0**x) if name == "perplexity" else None
        draws.append(_bars(hist, title, xlabel, transform))
        median = hist.quantile(0.5)
        value = 10.0**median if name == "perplexity" else median
        numbers.append((f"median_{name}", f"median {short}", _num(value, 4)))
    first = next(iter(hists.values()))
    numbers.insert(0, ("documents", "documents", _count(first.n)))
    caption = (
        "Per input row: perplexity and bits per byte (lower is more predictable text), and "
        "Min-K%++ (higher suggests the text was seen in training)."
    )
    return Panel("documents", "Documents", caption, numbers, draws)
