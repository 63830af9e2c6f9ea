"""The report's figures as base64 PNGs (embedded as data URIs, so the HTML file stands alone).

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never pyplot: no global figure state,
no backend switch in the caller's process, nothing left open. Each run keeps one colour in every plot.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


# Overlaid runs often coincide (same seed, same data): line style and marker differ too, so none hides another.
STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P"]


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if xlabel == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _line(ax, xs, ys, i: int, label: str) -> None:
    ax.plot(xs, ys, color=color(i), label=label, linewidth=1.6, linestyle=STYLES[i % len(STYLES)],
            marker=MARKERS[i % len(MARKERS)] if len(xs) <= 40 else None, markersize=4, alpha=0.9)


def curve(series: list[tuple[str, list, list]], title: str, ylabel: str, sci: bool = False) -> str | None:
    """One line per run: series = [(run name, steps, values)] in run order (empty series keep their colour)."""
    if not any(xs for _, xs, _ in series):
        return None
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, xs, ys) in enumerate(series):
        if xs:
            _line(ax, xs, ys, i, name)
    _style(ax, title, "step", ylabel)
    if sci:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(title="run", fontsize="small")
    return png(fig)


def dev_curves(panels: list[tuple[str, list[tuple[str, list, list]]]]) -> str | None:
    """Side-by-side panels, one per dev metric (the runs' best metrics, then dev loss)."""
    panels = [(m, s) for m, s in panels if any(xs for _, xs, _ in s)]
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels), 3.8), layout="constrained")
    for k, (metric, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for i, (name, xs, ys) in enumerate(series):
            if xs:
                _line(ax, xs, ys, i, name)
        _style(ax, f"dev {metric}", "step", metric)
        ax.legend(title="run", fontsize="small")
    return png(fig)


def confusion(labels: list[str], matrix: list[list[int]], title: str) -> str:
    m = np.asarray(matrix, dtype=float)
    n = len(labels)
    side = min(12.0, max(4.2, 0.55 * n + 2.5))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, shrink=0.8, label="examples")
    ticks = np.arange(n)
    short = [lab if len(lab) <= 18 else lab[:17] + "…" for lab in labels]
    ax.set_xticks(ticks, short, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(ticks, short)
    if n <= 30:  # beyond that the numbers are unreadable; the colour still shows the pattern
        hi = m.max() if m.size else 0
        for r in range(n):
            for c in range(n):
                ax.text(c, r, f"{int(m[r, c])}", ha="center", va="center", fontsize=9 if n <= 12 else 6,
                        color="white" if hi and m[r, c] > 0.6 * hi else "black")
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    return png(fig)


def reliability(bins: list[dict], ece: float, title: str) -> str:
    """Guo et al. 2017: accuracy per confidence bin as bars, the gap to the diagonal hatched, counts above."""
    fig = Figure(figsize=(5.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    for k, b in enumerate(bins):
        width, mid = b["high"] - b["low"], (b["low"] + b["high"]) / 2
        ax.bar(b["low"], b["accuracy"], width=width, align="edge", color=color(0), edgecolor="black",
               linewidth=0.6, label="accuracy" if k == 0 else None)
        ax.bar(b["low"], b["confidence"] - b["accuracy"], bottom=b["accuracy"], width=width, align="edge",
               fill=False, hatch="//", edgecolor=color(3), linewidth=0.6, label="gap to confidence" if k == 0 else None)
        ax.text(mid, max(b["accuracy"], b["confidence"]) + 0.015, str(b["count"]), ha="center", va="bottom",
                fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    _style(ax, f"{title}\nECE {ece:.4f}", "confidence (max class probability); above bars: examples", "accuracy")
    ax.legend(loc="upper left", fontsize="small")
    return png(fig)
