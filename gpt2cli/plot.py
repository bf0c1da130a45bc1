"""Loss curves of compared runs: a PNG/SVG figure (matplotlib, Agg, imported only when a figure
is written) and a compact text chart for the terminal.

Both take the columns of a :class:`gpt2cli.compare.Comparison`: every run is drawn; the runs of a
group (seeds) share a colour, thin, with their mean curve drawn bold where they were logged at the
same token counts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2cli.errors import UserError

Series = list[tuple[float, float]]
FORMATS = ("png", "svg")
MARKERS = "*o+x~@%&=$"
# Where two or more columns' curves fall in one cell: no column's marker hides another's.
OVERLAP = "#"


def mean_curve(series: Sequence[Series]) -> Series:
    """Mean over series at the token counts all of them share (empty if there are none)."""
    series = [s for s in series if s]
    if not series:
        return []
    maps = [dict(s) for s in series]
    common = sorted(set(maps[0]).intersection(*maps[1:]))
    return [(x, sum(m[x] for m in maps) / len(maps)) for x in common]


def _column_series(column: Any, which: str) -> list[Series]:
    getter = {"val": "val_points", "train": "train_points", "hellaswag": "hellaswag_points"}[which]
    return [s for s in (getattr(run, getter)() for run in column.runs) if s]


def _zoom_top(all_series: Sequence[Series]) -> float | None:
    """An upper y-limit that leaves out the first 10 % of the token range, where the loss falls
    from ln(vocab) and would squash the differences that matter. None (no zoom) unless the
    curves are dense enough (10 points or more) for that start to be a small part of them."""
    if not all_series or min(len(s) for s in all_series) < 10:
        return None
    xs = [x for s in all_series for x, _ in s]
    lo, hi = min(xs), max(xs)
    cut = lo + 0.1 * (hi - lo)
    tail = [y for s in all_series for x, y in s if x >= cut]
    return max(tail) if tail else None


# ---------------------------------------------------------------------------------- figure


def plot_format(path: str | Path) -> str:
    """"png" or "svg" from the file name; anything else is a UserError (checked before work)."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if p.name.lower() in (".png", ".svg"):  # a suffix alone is a hidden file's name to pathlib
        raise UserError(f"--plot {str(path)!r} has no file name before its suffix", "e.g. --plot curves.png")
    if fmt not in FORMATS:
        raise UserError(f"--plot {str(path)!r} must end in .png or .svg", "e.g. --plot curves.png")
    return fmt


def check_plot_path(path: str | Path) -> str:
    """The figure's format, once the path is known to be writable: not a folder, no file among its
    parents, and the nearest existing parent writable (missing folders are created). Checked before
    anything is computed or printed, so a bad --plot never comes after the table."""
    fmt = plot_format(path)
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--plot {str(path)!r} is a folder", f"name a file, e.g. --plot {p / ('curves.' + fmt)}")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--plot {str(path)!r} goes through {str(parent)!r}, which is a file, not a folder",
                        "choose another path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--plot {str(path)!r}: the folder {str(parent)!r} is not writable", "choose another path")
    return fmt


def write_plot(columns: Sequence[Any], path: str | Path, *, metric: str = "val_loss",
               target: float | None = None, title: str | None = None, sweep: Any = None) -> Path:
    """Write val loss (left) and train loss (right) against tokens for every run to ``path``
    (.png or .svg), then HellaSwag acc_norm where a run logged it (--hellaswag); with ``sweep``
    (gpt2cli.compare.SweepLines) a last panel: the metric against the swept field. Returns the path."""
    p = Path(path)
    fmt = plot_format(p)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise UserError("--plot needs matplotlib", "pip install matplotlib") from exc

    curves = [("val", "validation loss", "loss"), ("train", "train loss", "loss")]
    if any(_column_series(col, "hellaswag") for col in columns):
        curves.append(("hellaswag", "HellaSwag acc_norm", "accuracy"))
    n_panels = len(curves) + (1 if sweep else 0)
    fig = Figure(figsize=(5.5 * n_panels, 4.4), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot state
    axes = fig.subplots(1, n_panels)
    if sweep:
        _sweep_panel(axes[-1], sweep)
    for ax, (which, heading, quantity) in zip(axes, curves, strict=False):
        drawn: list[Series] = []
        for i, col in enumerate(columns):
            color = f"C{i % 10}"
            series = _column_series(col, which)
            mean = mean_curve(series) if len(series) > 1 else []
            for j, s in enumerate(series):
                xs, ys = zip(*s, strict=True)
                grouped = len(series) > 1
                ax.plot(xs, ys, color=color, lw=0.8 if grouped else 1.6, alpha=0.35 if grouped else 1.0,
                        marker="o" if len(s) == 1 else None, ms=3,
                        label=col.label if j == 0 and not mean else None)
            if mean:
                xs, ys = zip(*mean, strict=True)
                ax.plot(xs, ys, color=color, lw=2.0, label=f"{col.label} (mean of {len(series)})")
            drawn.extend(series)
        ax.set_title(heading)
        ax.set_xlabel("tokens")
        ax.set_ylabel(quantity)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no eval rows yet" if which == "val" else "no train rows yet",
                    ha="center", va="center", transform=ax.transAxes, color="0.4")
            continue
        line = _target_line(which, metric, target)
        if line is not None:
            # The axis is loss: a perplexity target is drawn at its loss, and says both.
            text = f"target ppl {target:g} (loss {line:.3f})" if metric == "val_ppl" else f"target {target:g}"
            ax.axhline(line, color="0.3", ls="--", lw=1, label=text)
        top = _zoom_top(drawn) if which != "hellaswag" else None  # accuracies rise: nothing to zoom past
        bottom = min(y for s in drawn for _, y in s)
        if top is not None and top > bottom:
            pad = 0.05 * (top - bottom)
            ax.set_ylim(bottom - pad, top + pad)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format=fmt, dpi=150)
    return p


def _sweep_panel(ax: Any, sweep: Any) -> None:
    """Mean ± std of the metric against the swept field, one line per group; single runs as dots."""
    xs_all: set[float] = set()
    for i, (label, points) in enumerate(sweep.lines.items()):
        color = f"C{i % 10}"
        xs = [x for x, _ in points]
        xs_all.update(xs)
        means = [stat.mean for _, stat in points]
        stds = [stat.std or 0.0 for _, stat in points]
        ax.errorbar(xs, means, yerr=stds, color=color, marker="o", ms=4, capsize=3,
                    label=label or sweep.metric.replace("_", " "))
        for x, stat in points:
            if len(stat.values) > 1:
                ax.plot([x] * len(stat.values), stat.values, ".", color=color, alpha=0.4, ms=4)
    if not xs_all:
        ax.text(0.5, 0.5, "no eval rows yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
    elif min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 4:  # a geometric grid, as lr sweeps are
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs_all), [f"{x:g}" for x in sorted(xs_all)])
        ax.minorticks_off()
    spread = "geometric mean" if sweep.metric.endswith("_ppl") else "mean ± std"
    ax.set_title(f"{sweep.metric.replace('_', ' ')} vs {sweep.field} ({spread})")
    ax.set_xlabel(sweep.field)
    ax.set_ylabel(sweep.metric.replace("_", " "))
    ax.grid(alpha=0.3)
    if xs_all:
        ax.legend(fontsize="small")


def _target_line(which: str, metric: str, target: float | None) -> float | None:
    if target is None:
        return None
    if which == "val" and metric == "val_loss":
        return target
    if which == "val" and metric == "val_ppl" and target > 0:
        return math.log(target)
    if which == "train" and metric == "train_loss":
        return target
    if which == "hellaswag" and metric == "hellaswag_acc_norm":
        return target
    return None


# ---------------------------------------------------------------------------- text chart


def terminal_chart(columns: Sequence[Any], width: int = 64, height: int = 12) -> str:
    """A compact text chart of loss against tokens, one marker per column (the mean curve of a
    group). Val loss where runs have at least two eval rows, else train loss; "" if neither."""
    which = "val"
    curves = [_chart_curve(c, "val") for c in columns]
    if not any(len(c) > 1 for c in curves):
        which = "train"
        curves = [_chart_curve(c, "train") for c in columns]
    drawn = [c for c in curves if c]
    if not drawn:
        return ""
    xs = [x for c in drawn for x, _ in c]
    x_lo, x_hi = min(xs), max(xs)
    y_lo = min(y for c in drawn for _, y in c)
    y_hi = _zoom_top(drawn) or max(y for c in drawn for _, y in c)
    if y_hi <= y_lo:
        y_hi = y_lo + 1e-6
    grid = [[" "] * width for _ in range(height)]
    owner: dict[tuple[int, int], int] = {}  # cell -> the first curve drawn there
    for i, curve in enumerate(curves):
        if not curve:
            continue
        mark = MARKERS[i % len(MARKERS)]
        for cx in range(width):
            x = x_lo + (x_hi - x_lo) * cx / max(1, width - 1)
            y = _interpolate(curve, x, half_step=(x_hi - x_lo) / max(1, width - 1) / 2)
            if y is None:
                continue
            y = min(max(y, y_lo), y_hi)
            row = round((y_hi - y) / (y_hi - y_lo) * (height - 1))
            first = owner.setdefault((row, cx), i)
            grid[row][cx] = mark if first == i else OVERLAP
    label_w = max(len(f"{y_hi:.3f}"), len(f"{y_lo:.3f}"))
    lines = [f"{'val' if which == 'val' else 'train'} loss against tokens"]
    for r, cells in enumerate(grid):
        if r == 0:
            label = f"{y_hi:.3f}"
        elif r == height - 1:
            label = f"{y_lo:.3f}"
        else:
            label = ""
        lines.append(f"{label:>{label_w}} |" + "".join(cells).rstrip())
    lines.append(" " * label_w + " +" + "-" * width)
    left, right = _si(x_lo), _si(x_hi)
    lines.append(" " * (label_w + 2) + left + " " * max(1, width - len(left) - len(right)) + right)
    for i, (col, curve) in enumerate(zip(columns, curves, strict=True)):
        if curve:
            lines.append(f"  {MARKERS[i % len(MARKERS)]} {col.label}")
    if any(OVERLAP in cells for cells in grid):
        lines.append(f"  {OVERLAP} two or more of them")
    return "\n".join(lines)


def _chart_curve(column: Any, which: str) -> Series:
    series = _column_series(column, which)
    if len(series) > 1:
        mean = mean_curve(series)
        if mean:
            return mean
    return series[0] if series else []


def _interpolate(curve: Series, x: float, half_step: float = 0.0) -> float | None:
    """The curve's value at x (linear between points); a lone point fills its own cell only."""
    if len(curve) == 1:
        return curve[0][1] if abs(x - curve[0][0]) <= half_step else None
    if x < curve[0][0] or x > curve[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"
