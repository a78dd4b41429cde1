"""The run report: one self-contained HTML page of figures, drawn from `lib/inspect/run_stats.py`.

`build(out_dir)` aggregates the run (see run_stats) and lays it out as panels: a figure with a
one-line caption saying how to read it, and its numbers beside it. `render_html` makes the page,
whose figures are inline PNGs (matplotlib, Agg) with no scripts or links, so it opens offline in
any browser; `render_png` draws every figure into one image (the README's screenshot). A
directory without `_SUCCESS` is drawn from its committed shards and marked partial.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lib import storage
from lib.errors import output_error
from lib.inspect.panels import (
    STYLE,
    Draw,
    Panel,
    batching_panel,
    calibration_panel,
    documents_panel,
    lengths_panel,
    run_panel,
    throughput_panel,
    token_panels,
)
from lib.inspect.run_stats import (
    RunInfo,
    TokenStats,
    read_run,
    scan_documents,
    scan_tokens,
    stored_calibration,
)
from lib.output import layout
from lib.storage import AnyPath


# -- the report as a whole ---------------------------------------------------------------------
@dataclass
class Report:
    """What the page shows: the run's bookkeeping and its panels."""

    info: RunInfo
    tokens: TokenStats | None
    panels: list[Panel]


def build(out_dir: str | AnyPath) -> Report:
    """Read and aggregate everything the report draws (one pass over the shards)."""
    info = read_run(out_dir)
    stats = scan_tokens(info)
    panels = [run_panel(info), lengths_panel(info), batching_panel(info), throughput_panel(info)]
    if stats is not None:
        panels += token_panels(stats)
    calibration = stored_calibration(info)
    if calibration is None and stats is not None:
        calibration = stats.calibration
    if calibration is not None:
        panels.append(calibration_panel(calibration))
    documents = scan_documents(info.out_dir)
    if documents:
        panels.append(documents_panel(documents))
    return Report(info, stats, panels)


def figure_png(draws: list[Draw], height: float = 3.4, dpi: int = 100) -> bytes:
    """The drawings side by side in one PNG (Agg)."""
    with rc_context(STYLE):
        width = 5.4 * len(draws)
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        # Fixed margins in inches: constrained layout measured half the report's drawing time.
        fig.subplots_adjust(
            left=0.8 / width,
            right=1 - 0.25 / width,
            bottom=0.62 / height,
            top=1 - 0.42 / height,
            wspace=0.3,
        )
        for ax, draw in zip(fig.subplots(1, len(draws), squeeze=False)[0], draws, strict=True):
            draw(ax)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


# -- the page ----------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;
margin:0;background:#fafafa}
main{max-width:1220px;margin:0 auto;padding:20px 24px 48px;background:#fff}
h1{font-size:22px;margin:0}
h2{font-size:17px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid #ddd}
.path{color:#555;margin:2px 0 12px;font-family:ui-monospace,Menlo,Consolas,monospace}
.status{padding:8px 12px;border-radius:6px;margin:10px 0}
.complete{background:#e8f4ea;border:1px solid #9fcda8}
.partial{background:#fff3cd;border:1px solid #e0c36a}
.row{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}
.row img{max-width:100%;height:auto}
.side{flex:1;min-width:260px}
.caption{margin:0 0 10px;color:#333}
table{border-collapse:collapse}
td{padding:2px 14px 2px 0;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.identity td:first-child,.side td:first-child{color:#555}
.identity td.num{text-align:left}
details{margin-top:8px}
"""
_IDENTITY = (
    ("path", "model"),
    ("architecture", "architecture"),
    ("model_type", "model type"),
    ("commit", "commit"),
    ("dtype", "dtype"),
    ("vocab_size", "vocabulary"),
    ("tokenizer", "tokenizer"),
    ("tokenizer_size", "tokenizer size"),
)


def _rows(items: list[tuple[str, str, str]]) -> str:
    """Table rows of (key, label, value); the key becomes the value cell's data-key."""
    return "".join(
        f'<tr><td>{html.escape(label)}</td><td class="num" data-key="{html.escape(key)}">'
        f"{html.escape(value)}</td></tr>"
        for key, label, value in items
    )


def _header(info: RunInfo) -> str:
    """The page up to its first section: title, path, complete or partial."""
    where = html.escape(str(info.out_dir))
    units = f"{len(info.records):,} committed units"
    if info.partial:
        status = (
            f'<p class="status partial"><b>Partial output</b>: no {layout.SUCCESS}, so the job '
            f"has not finished (or was stopped); drawn from its {units}.</p>"
        )
    elif info.manifest.exported_from:
        source = html.escape(info.manifest.exported_from)
        status = (
            f'<p class="status complete"><b>Complete</b>: a plain copy of {source} '
            "(<code>logit-extract export</code>); its per-unit figures are in that output's "
            "report.</p>"
        )
    else:
        status = (
            f'<p class="status complete"><b>Complete</b>: {units}, every row accounted for.</p>'
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Run report: {where}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>Run report</h1><p class="path">{where}</p>{status}'
    )


def _model_name(info: RunInfo) -> str:
    """The model path, with its architecture when the manifest names it."""
    model = info.manifest.model if info.manifest else {}
    path = model.get("path") or info.config.model.path
    return f"{path} ({model['architecture']})" if model.get("architecture") else str(path)


def _identity(info: RunInfo) -> str:
    """Model and tokenizer identity, then the resolved config."""
    model = info.manifest.model if info.manifest else {"path": info.config.model.path}
    items = [
        (key, label, str(model[key])) for key, label in _IDENTITY if model.get(key) is not None
    ]
    config = [
        (f"{section}.{key}", f"{section}.{key}", "null" if value is None else str(value))
        for section, values in info.config.to_dict().items()
        for key, value in values.items()
    ]
    return (
        f'<h2>Model</h2><table class="identity">{_rows(items)}</table>'
        f'<details><summary>config</summary><table class="identity">{_rows(config)}'
        "</table></details>"
    )


def _section(panel: Panel) -> str:
    """A panel as a section: its figure, caption and numbers."""
    image = base64.b64encode(figure_png(panel.draws, panel.height)).decode("ascii")
    title = html.escape(panel.title)
    return (
        f'<section id="{panel.key}"><h2>{title}</h2><div class="row">'
        f'<img alt="{title}" src="data:image/png;base64,{image}">'
        f'<div class="side"><p class="caption">{html.escape(panel.caption)}</p>'
        f"<table>{_rows(panel.numbers)}</table></div></div></section>"
    )


def render_html(report: Report) -> str:
    """The self-contained page: inline CSS and PNGs, no scripts, no links."""
    info = report.info
    parts = [_header(info)]
    parts.append(_section(report.panels[0]))
    parts.append(_identity(info))
    parts += [_section(panel) for panel in report.panels[1:]]
    parts.append("</main></body></html>")
    return "\n".join(parts)


def render_png(report: Report, dpi: int = 64) -> bytes:
    """Every figure of the report in one image, under a header of the run's numbers."""
    draws = [draw for panel in report.panels for draw in panel.draws]
    columns = 3
    rows = -(-len(draws) // columns)
    with rc_context(STYLE):
        fig = Figure(figsize=(5.2 * columns, 1.0 + 3.3 * rows), layout="constrained")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(rows + 1, columns, height_ratios=[0.9] + [3.3] * rows)
        header = fig.add_subplot(grid[0, :])
        header.set_axis_off()
        title = f"Run report: {report.info.out_dir} · {_model_name(report.info)}"
        header.text(0, 0.95, title, size=14, weight="bold", va="top")
        numbers = {key: value for key, _, value in report.panels[0].numbers}
        status = "partial" if report.info.partial else "complete"
        line = (
            f"{status} · {numbers['scored_rows']} rows scored, {numbers['skipped_rows']} skipped, "
            f"{numbers['truncated_rows']} truncated · {numbers['output_rows']} output rows · "
            f"{numbers['tokens']} tokens in {numbers['wall_s']} ({numbers['tokens_per_s']} tokens/s)"
        )
        header.text(0, 0.25, line, size=10, va="top", color="#333")
        for i, draw in enumerate(draws):
            draw(fig.add_subplot(grid[1 + i // columns, i % columns]))
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def _write(path: AnyPath, data: bytes, out_dir: AnyPath) -> None:
    """Atomically: through OUT/_tmp inside the output directory, a sibling temporary elsewhere
    (an object store writes an object whole)."""
    if path.resolve().parent == out_dir.resolve() or storage.is_remote(path):
        layout.write_atomic(path, data, out_dir)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise output_error(path, exc) from None


def write_report(
    out_dir: str | AnyPath, output: str | AnyPath | None = None, png: str | AnyPath | None = None
) -> tuple[AnyPath, Report]:
    """Write the HTML report (default OUT/_report.html), and the one-image PNG if asked."""
    out_dir = storage.location(out_dir)
    report = build(out_dir)
    try:  # a report killed mid-write left its temporary; a live writer's stays
        layout.remove_dead_temporaries(out_dir, holding_lease=False)
    except OSError:
        pass  # read-only access still draws the report elsewhere
    path = storage.location(output) if output is not None else out_dir / layout.REPORT
    _write(path, render_html(report).encode("utf-8"), out_dir)
    if output is None:  # an older version's report.html would read as data at OUT
        try:
            (out_dir / layout.OLD_REPORT).unlink(missing_ok=True)
        except OSError:
            pass
    if png is not None:
        _write(storage.location(png), render_png(report), out_dir)
    return path, report
