"""The load-test report's charts: one question per chart, inline SVG in the style of `charts`.

Per scenario: is TTFT within its SLO over time, is request duration, where do the percentiles sit
against the SLOs, did throughput keep up with what was asked, how many output tokens per second,
which errors and when (429s in the throttling scenario drawn as the expected answer they are), how
steady the token stream is (ITL), and with --engine-metrics the engine's queue and KV cache. Each is
one function taking the scenario's rows and returning a Chart, or None when it has nothing to show
(no streamed call, no error): add a chart by writing one more and listing it in SCENARIO_CHARTS.
TTFOT (first output token after the reasoning) is drawn only when the model reasoned: without
reasoning tokens it is TTFT again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from opskit.loadtest.charts import (
    COLORS,
    ERROR_COLORS,
    Chart,
    chart,
    latency_scale,
    legend,
    ms_label,
    slo_line,
)
from opskit.loadtest.results import itl_gaps

QUANTILES = (50, 75, 90, 95, 99, 99.9)


@dataclass
class Rows:
    """One scenario's rows and what the charts need besides them."""

    df: pd.DataFrame
    slo: dict[str, float] = field(default_factory=dict)  # ttft_p95 / duration_p90 limits, seconds
    summary: dict = field(default_factory=dict)  # the scenario's summary (asked rate, throttling limit)

    @property
    def ok(self) -> pd.DataFrame:
        return self.df[self.df["ok"]]

    @property
    def streamed(self) -> pd.DataFrame:
        ok = self.ok
        return ok[ok["streamed"].fillna(False).astype(bool)].dropna(subset=["ttft_s"])

    @property
    def width(self) -> float:
        """Seconds per time bin: 1 s, or wider so a long run has at most ~60 bins."""
        span = float(self.df["t"].max()) if len(self.df) else 0.0
        return float(max(1, math.ceil(span / 60))) if span == span else 1.0

    @property
    def reasoned(self) -> bool:
        return float(self.ok["reasoning_tokens"].fillna(0).sum()) > 0


def _bin(t: pd.Series, width: float) -> pd.Series:
    return (t // width) * width + width / 2


def _per_bin(rows: pd.DataFrame, col: str, q: float, width: float) -> pd.Series:
    """The q-quantile of `col` per time bin, ms; NaN in bins without calls, so a line breaks there
    instead of drawing a trend through a gap."""
    binned = rows.groupby(_bin(rows["t"], width))[col].quantile(q) * 1000
    if binned.empty:
        return binned
    full = np.arange(binned.index.min(), binned.index.max() + width / 2, width)
    return binned.reindex(full.round(6)).set_axis(full) if len(full) < 10_000 else binned


def _over_time(ax, rows: pd.DataFrame, col: str, label: str, color: str, q: float, width: float) -> None:
    """Each call as a faint dot, and per time bin the median (dotted) and the judged percentile."""
    ax.scatter(rows["t"], rows[col] * 1000, s=5, alpha=0.25, color=color, linewidths=0, rasterized=True)
    p50, pq = _per_bin(rows, col, 0.5, width), _per_bin(rows, col, q, width)
    ax.plot(p50.index, p50.values, ":", color=color, lw=1.2, label=f"{label} p50")
    ax.plot(pq.index, pq.values, "-", marker="o", ms=3, color=color, lw=2, label=f"{label} p{q * 100:g}")
    ax.set_xlabel(f"s since start (per {width:g} s)")


def ttft_over_time(r: Rows) -> Chart | None:
    """TTFT of streamed calls per time bin against the TTFT objective (TTFOT too for reasoning models)."""
    rows, limit = r.streamed, r.slo.get("ttft_p95")
    if rows.empty:
        return None

    def draw(ax):
        _over_time(ax, rows, "ttft_s", "TTFT", COLORS["ttft"], 0.95, r.width)
        values = list(rows["ttft_s"] * 1000)
        if r.reasoned and rows["ttfot_s"].notna().any():
            out = rows.dropna(subset=["ttfot_s"])
            p95 = _per_bin(out, "ttfot_s", 0.95, r.width)
            ax.plot(p95.index, p95.values, color=COLORS["ttfot"], lw=2, label="TTFOT p95 (answer after reasoning)")
            values += list(out["ttfot_s"] * 1000)
        latency_scale(ax, values, [limit * 1000] if limit else [])
        if limit:
            slo_line(ax, limit * 1000, f"SLO TTFT p95 < {ms_label(limit)}")
        legend(ax)

    return chart("Is time to first token within its SLO over time?" if limit else
                 "How did time to first token move over the run?", draw)


def duration_over_time(r: Rows) -> Chart | None:
    """Whole-call duration per time bin against the duration objective."""
    rows, limit = r.ok.dropna(subset=["duration_s"]), r.slo.get("duration_p90")
    if rows.empty:
        return None

    def draw(ax):
        _over_time(ax, rows, "duration_s", "duration", COLORS["duration"], 0.9, r.width)
        latency_scale(ax, rows["duration_s"] * 1000, [limit * 1000] if limit else [])
        if limit:
            slo_line(ax, limit * 1000, f"SLO duration p90 < {ms_label(limit)}")
        legend(ax)

    return chart("Is request duration within its SLO over time?" if limit else
                 "How did request duration move over the run?", draw)


def percentiles(r: Rows) -> Chart | None:
    """The latency distribution as percentiles, the judged one ringed, each objective as a line."""
    series = [(r.streamed["ttft_s"], "TTFT", COLORS["ttft"], r.slo.get("ttft_p95"), 95),
              (r.ok["duration_s"].dropna(), "duration", COLORS["duration"], r.slo.get("duration_p90"), 90)]
    series = [s for s in series if len(s[0])]
    if not series:
        return None

    def draw(ax):
        values, limits = [], []
        for s, label, color, limit, judged in series:
            ys = np.percentile(s, QUANTILES) * 1000
            ax.plot(range(len(QUANTILES)), ys, "o-", color=color, label=label)
            if limit:
                i = QUANTILES.index(judged)
                ax.plot([i], [ys[i]], "o", ms=12, mfc="none", mec=color, mew=1.5)
            values += list(ys)
            if limit:
                limits.append(limit * 1000)
        latency_scale(ax, values, limits)
        for _, label, color, limit, judged in series:
            if limit:
                slo_line(ax, limit * 1000, f"SLO {label} p{judged} < {ms_label(limit)}", color=color)
        ax.set_xticks(range(len(QUANTILES)), [f"p{q:g}" for q in QUANTILES])
        ax.set_xlabel("percentile of successful calls" + (" (ringed: judged)" if limits else ""))
        legend(ax)

    judged = any(s[3] for s in series)
    return chart("Where does the latency distribution sit against the SLOs?" if judged else
                 "How is latency distributed over the calls?", draw)


def throughput(r: Rows) -> Chart | None:
    """Completed and started requests per second against the asked rate (or the throttling limit)."""
    if r.df.empty:
        return None
    asked, th, w = r.summary.get("requested_rate"), r.summary.get("throttling"), r.width
    limit = th["limit_requests"] / th["window_s"] if th and th.get("limit_requests") else None
    if asked:
        question = f"Did throughput keep up with the asked {asked:.3g} req/s?"
    elif limit:
        question = "How much did the target accept against its rate limit?"
    else:
        question = "How many requests per second completed?"

    def draw(ax):
        ok = r.ok.dropna(subset=["duration_s"])
        done = _bin(ok["t"] + ok["duration_s"], w).value_counts().sort_index() / w
        started = _bin(r.df["t"].dropna(), w).value_counts().sort_index() / w
        ax.bar(done.index, done.values, width=0.85 * w, color=COLORS["ok"], alpha=0.8,
               label="accepted and completed" if th else "completed")
        ax.step(started.index, started.values, where="mid", color=COLORS["sent"], lw=1.2, label="started")
        if asked:
            slo_line(ax, asked, f"asked {asked:.3g} req/s", color=COLORS["asked"])
        if limit:
            slo_line(ax, limit, f"limit {th['limit_requests']:g} per {th['window_s']:g} s = {limit:.3g} req/s",
                     color=COLORS["asked"])
        ax.set_ylim(0, max([float(started.max()) if len(started) else 1, asked or 0, limit or 0]) * 1.2)
        ax.set(xlabel=f"s since start (per {w:g} s)", ylabel="requests/s")
        legend(ax)

    return chart(question, draw)


def tokens(r: Rows) -> Chart | None:
    """Output tokens per second, summed over every call finishing in each time bin."""
    ok = r.ok.dropna(subset=["duration_s"])
    if ok.empty or not ok["output_tokens"].fillna(0).sum():
        return None
    w = r.width

    def draw(ax):
        per = ok.assign(_b=_bin(ok["t"] + ok["duration_s"], w)).groupby("_b")["output_tokens"].sum() / w
        ax.fill_between(per.index, per.values, step="mid", color=COLORS["tokens"], alpha=0.3)
        ax.step(per.index, per.values, where="mid", color=COLORS["tokens"], lw=1.5, label="output tokens/s")
        mean = r.summary.get("output_tokens_s")
        if mean:
            ax.axhline(mean, color=COLORS["asked"], ls=":", lw=1.2, label=f"run average {mean:.0f} tokens/s")
        ax.set_ylim(0, float(per.max()) * 1.2)
        ax.set(xlabel=f"s since start (per {w:g} s)", ylabel="tokens/s")
        legend(ax)

    return chart("How many output tokens per second came back?", draw)


def errors(r: Rows) -> Chart | None:
    """Failed calls per second by type; in the throttling scenario 429s are the expected answer."""
    df = r.df
    bad = df[~df["ok"] | (df["status"] == 429)]
    if bad.empty:
        return None
    expected = bool(r.summary.get("throttling"))
    w = r.width
    names = bad["error_type"].replace("", "other") + bad["status"].map(lambda s: f" {s}" if s else "")
    names = names.where(bad["status"] != 429, "429 rate limited (expected)" if expected else "429 rate limited")

    def draw(ax):
        table = pd.crosstab(_bin(bad["t"], w), names) / w
        bottom = np.zeros(len(table))
        colors = iter(ERROR_COLORS * 4)
        for kind in sorted(table.columns, key=lambda k: (not k.endswith("(expected)"), k)):
            color = COLORS["expected"] if kind.endswith("(expected)") else next(colors)
            total = int(round(table[kind].sum() * w))
            ax.bar(table.index, table[kind].values, bottom=bottom, width=0.85 * w, color=color,
                   label=f"{kind}: {total}")
            bottom += table[kind].values
        ax.set(xlabel=f"s since start (per {w:g} s)", ylabel="calls/s")
        legend(ax)

    if expected:
        return chart("When did the target throttle (429s expected here), and did anything else fail?", draw)
    return chart("Which errors, and when?", draw)


def itl(r: Rows) -> Chart | None:
    """The spread of inter-token gaps over every successful stream, its p50 and p99 marked."""
    gaps = itl_gaps(r.df) * 1000
    if gaps.empty:
        return None

    def draw(ax):
        top = float(gaps.quantile(0.999))
        ax.hist(gaps.clip(upper=top), bins=50, color=COLORS["itl"], alpha=0.85)
        for q, ls in ((0.5, ":"), (0.99, "--")):
            v = float(gaps.quantile(q))
            ax.axvline(v, color="black", ls=ls, lw=1.2, label=f"p{q * 100:g} {v:.1f} ms")
        ax.set(xlabel="ms between tokens (clipped at p99.9)", ylabel="gaps")
        legend(ax)

    return chart("How steady is the token stream (inter-token latency)?", draw)


SCENARIO_CHARTS: tuple[Callable[[Rows], Chart | None], ...] = (
    ttft_over_time, duration_over_time, percentiles, throughput, tokens, errors, itl)


def scenario_charts(df: pd.DataFrame, slo: dict[str, float] | None = None, summary: dict | None = None) -> list[Chart]:
    """Every chart with something to show for one scenario's rows."""
    r = Rows(df, slo or {}, summary or {})
    return [c for fn in SCENARIO_CHARTS if (c := fn(r)) is not None]


def all_figures(df: pd.DataFrame, slo: dict[str, dict[str, float]] | None = None,
                summaries: dict[str, dict] | None = None) -> dict[str, list[Chart]]:
    """scenario -> its charts; `slo`: scenario -> objective -> limit (s); `summaries`: scenario -> summary."""
    return {str(name): scenario_charts(part, (slo or {}).get(str(name)), (summaries or {}).get(str(name)))
            for name, part in df.groupby("scenario")}


def engine_charts(df: pd.DataFrame, engine: dict) -> list[Chart]:
    """The engine's queue, and its KV cache beside the client's TTFT, from the sampler's series
    (a scenario summary's `engine` entry); none without samples."""
    series = pd.DataFrame(engine.get("series") or [])
    if series.empty:
        return []
    name = engine.get("engine") or "engine"

    def queue(ax):
        ax.plot(series["t_s"], series["waiting"], color=COLORS["ttft"], lw=2, label="waiting")
        ax.plot(series["t_s"], series["running"], color=COLORS["duration"], lw=2, label="running")
        ax.set_ylim(bottom=0)
        ax.set(xlabel="s since the first sample", ylabel="requests")
        legend(ax)

    def kv(ax):
        if series["kv_usage"].notna().any():
            ax.plot(series["t_s"], series["kv_usage"] * 100, color=COLORS["slo"], lw=2, label="KV cache usage %")
        ax.set_ylim(0, 105)
        ax.set(xlabel="s since start", ylabel="% of KV cache")
        ok = df[df["ok"]].dropna(subset=["ttft_s"])
        twin = ax.twinx()
        if len(ok):
            p95 = _per_bin(ok, "ttft_s", 0.95, 1.0)
            twin.plot(p95.index, p95.values, color=COLORS["ttft"], lw=1.5, label="client TTFT p95 (ms)")
            twin.set_ylim(bottom=0)
        twin.set_ylabel("ms")
        twin.grid(False)
        twin.spines["right"].set_visible(True)
        legend(ax, twin)

    charts = [chart(f"Did requests queue in the engine ({name})?", queue),
              chart("Did the KV cache fill up as client TTFT rose?", kv)]
    return [c for c in charts if c is not None]
