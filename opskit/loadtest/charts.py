"""The chart style of opskit's reports: one question per chart, written as inline SVG.

A chart is a small matplotlib figure (Agg backend, no display) that answers one question, which the
page prints above it as the caption. It is SVG with its text kept as text, so it stays crisp at any
zoom, is searchable, and needs no file beside the page; dense point clouds are rasterized at 2x
inside the SVG so a run of 40,000 requests is still a small page. SLO limits are dashed lines that
carry their own label on the line ("SLO TTFT p95 < 500 ms"), not only in a legend.

Used by the load-test report (`plots`) and the capacity report (`capacity_report`).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

# One colour per kind of series, the same in every chart of a page.
COLORS = {"ttft": "#d95f02", "ttfot": "#e7298a", "duration": "#1b6ca8", "itl": "#7570b3", "ok": "#1b9e77",
          "sent": "#333333", "asked": "#666666", "tokens": "#2a9d8f", "expected": "#9e9e9e", "slo": "#c00000"}
ERROR_COLORS = ("#c00000", "#e6550d", "#8c2d04", "#756bb1", "#636363", "#fd8d3c", "#de2d26", "#31a354")

STYLE = {"font.size": 10.5, "axes.titlesize": 10.5, "axes.labelsize": 10.5, "legend.fontsize": 9.5,
         "xtick.labelsize": 9.5, "ytick.labelsize": 9.5, "axes.spines.top": False, "axes.spines.right": False,
         "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False, "svg.fonttype": "none",
         "svg.hashsalt": "opskit", "font.family": "sans-serif"}
# inches (SVG units are points): a phone's ~375 px shows it a little over 1:1, so 9.5 pt text reads
# as ~10 px there; two abreast on a laptop scale it to about the page's own 16 px
SIZE = (4.8, 3.0)


@dataclass(frozen=True)
class Chart:
    """One question and the inline SVG that answers it."""

    question: str
    svg: str


def chart(question: str, draw: Callable, size: tuple[float, float] = SIZE) -> Chart | None:
    """Run `draw(ax)` on a fresh figure and return it as a Chart; None when `draw` returns False
    (nothing to show: the page says so in words instead of an empty frame)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=size, layout="constrained")
        try:
            if draw(ax) is False:
                return None
            return Chart(question, to_svg(fig))
        finally:
            plt.close(fig)


def to_svg(fig) -> str:
    """The figure as an <svg> element to inline in HTML: no XML prologue, no fixed size (CSS sizes it
    from its viewBox), and ids prefixed by a hash of the drawing so two charts on a page never share one."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", dpi=144, metadata={"Date": None})  # dpi: the rasterized parts, at 2x
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="chart"', text, count=1)
    # inline in HTML an SVG needs no namespaces, and matplotlib's RDF metadata is links to schemas:
    # without them the page names no URL at all
    text = re.sub(r' xmlns(:xlink)?="[^"]*"', "", text)
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, count=1, flags=re.S)
    prefix = "c" + hashlib.sha1(text.encode()).hexdigest()[:8] + "-"
    text = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}\1"', text)
    return re.sub(r'(href="#|url\(#)([^")]+)', rf"\1{prefix}\2", text)


def legend(ax, *more) -> None:
    """The legend under the plot area, never over the data, in as many columns as fit the chart's
    width (~66 characters at this size); nothing when nothing is labelled (matplotlib would warn)."""
    handles, labels = ax.get_legend_handles_labels()
    for other in more:
        h, lab = other.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if labels:
        longest = max(len(label) for label in labels)
        ncol = next(n for n in (3, 2, 1) if n == 1 or n * (longest + 5) <= 66)
        ax.figure.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(labels)))


def slo_line(ax, limit: float, text: str, color: str = COLORS["slo"], right: bool = True) -> None:
    """A dashed horizontal line at an objective (or an asked rate), labelled on the line itself."""
    ax.axhline(limit, color=color, ls="--", lw=1.4)
    ax.annotate(text, xy=(1 if right else 0, limit), xycoords=("axes fraction", "data"), xytext=(-3 if right else 3, 3),
                textcoords="offset points", ha="right" if right else "left", va="bottom", color=color,
                fontsize=9.5, bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})


def latency_scale(ax, values_ms: Iterable[float], limits_ms: Iterable[float], axis: str = "y",
                  log: bool | None = None) -> None:
    """Linear from 0 when the data and the SLO lines share a scale; logarithmic when an objective sits
    far above the data, so the data keeps its shape and the line stays on the chart (or as `log` says)."""
    v = np.asarray([x for x in values_ms if x == x], dtype=float)
    limits = [x for x in limits_ms if x is not None]
    top = float(np.percentile(v, 99)) if len(v) else 0.0
    if log is None:
        log = bool(limits) and top > 0 and max(limits) > 4 * top
    if log and len(v) and float(v.min()) > 0:
        from matplotlib.ticker import FuncFormatter, LogLocator

        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        target = ax.yaxis if axis == "y" else ax.xaxis
        target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        target.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        (ax.set_ylabel if axis == "y" else ax.set_xlabel)("ms (log scale)")
        hi = max([*limits, float(v.max())]) * 1.5
        lo = max(min([*limits, float(v.min())]) / 1.5, 1e-3)
        (ax.set_ylim if axis == "y" else ax.set_xlim)(lo, hi)
    else:
        hi = max([*limits, float(v.max()) if len(v) else 1.0]) * 1.12
        (ax.set_ylim if axis == "y" else ax.set_xlim)(0, hi)
        (ax.set_ylabel if axis == "y" else ax.set_xlabel)("ms")


def ms_label(seconds: float) -> str:
    """500 ms, 2000 ms, 12.5 ms: limits as people wrote them."""
    return f"{seconds * 1000:g} ms"
