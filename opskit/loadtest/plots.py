"""Report plots with matplotlib (Agg backend, no display), returned as base64 PNGs for data URIs.

One figure per scenario, six panels, one question each: how did latency move over time (points and a
rolling p95), where do the percentiles sit, how is TTFT spread (its own axis: beside whole-call
durations it shrank to a spike), throughput per second, errors by type per second (429s labelled as
such), and the ITL histogram. Latency panels carry the scenario's SLO limits as dashed lines. PNGs
at 2x (144 dpi), so they stay crisp on high-density screens.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd

from opskit.loadtest.results import itl_gaps


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=144)  # tight_layout already ran; a "tight" bbox would measure it all again
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _legend(ax, **kwargs) -> None:
    """A legend, or for a panel with nothing to plot (no successful call) a note: matplotlib would warn
    on stderr about a legend with no labelled artists, in the middle of the verdict."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=9, **kwargs)
    else:
        ax.text(0.5, 0.5, "no successful calls", ha="center", va="center", transform=ax.transAxes)


SLO_STYLE = {"linestyle": "--", "linewidth": 1.2}
SLO_COLORS = {"duration_p90": "tab:blue", "ttft_p95": "tab:orange"}


def _slo_lines(ax, slo: dict[str, float], horizontal: bool = True, only: tuple[str, ...] = tuple(SLO_COLORS)) -> None:
    """Dashed lines at the scenario's latency objectives (ms), labelled with the objective."""
    for name in only:
        if (limit := slo.get(name)) is None:
            continue
        draw = ax.axhline if horizontal else ax.axvline
        draw(limit * 1000, color=SLO_COLORS[name], label=f"SLO {name.replace('_', ' ')} {limit * 1000:g} ms",
             **SLO_STYLE)


def _over_time(ax, df: pd.DataFrame, slo: dict[str, float]) -> None:
    ok = df[df["ok"]].sort_values("t")
    for col, label, color in (("duration_s", "duration", "tab:blue"), ("ttft_s", "TTFT", "tab:orange")):
        s = ok[["t", col]].dropna()
        if s.empty:
            continue
        ax.plot(s["t"], s[col] * 1000, ".", ms=2, alpha=0.3, color=color)
        window = max(1, min(200, len(s) // 20))
        ax.plot(s["t"], s[col].rolling(window, min_periods=1).quantile(0.95) * 1000, color=color,
                label=f"{label} (rolling p95)")
    _slo_lines(ax, slo)
    ax.set(title="latency over time", xlabel="s since start", ylabel="ms")
    _legend(ax)


def _percentiles(ax, df: pd.DataFrame, slo: dict[str, float]) -> None:
    ok = df[df["ok"]]
    qs = np.array([50, 75, 90, 95, 99, 99.9])
    for col, label in (("duration_s", "duration"), ("ttft_s", "TTFT")):
        s = ok[col].dropna()
        if len(s):
            ax.plot(range(len(qs)), np.percentile(s, qs) * 1000, "o-", label=label)
    _slo_lines(ax, slo)
    ax.set_xticks(range(len(qs)), [f"p{q:g}" for q in qs])
    ax.set(title="percentiles", ylabel="ms")
    _legend(ax)


def _histograms(ax, df: pd.DataFrame, slo: dict[str, float]) -> None:
    s = df[df["ok"]]["ttft_s"].dropna()
    if len(s):
        ax.hist(s * 1000, bins=40, color="tab:orange", label="TTFT")
        limit = slo.get("ttft_p95")
        if limit is not None and limit > 2 * s.max():  # drawn, it would squeeze the spread into a spike
            ax.text(0.98, 0.95, f"SLO ttft p95 {limit * 1000:g} ms: far right of this scale", ha="right",
                    va="top", transform=ax.transAxes, fontsize=9, color="tab:orange")
        else:
            _slo_lines(ax, slo, horizontal=False, only=("ttft_p95",))
    ax.set(title="time to first token", xlabel="ms", ylabel="requests")
    _legend(ax)


def _throughput(ax, df: pd.DataFrame, slo: dict[str, float]) -> None:
    ok = df[df["ok"]]
    end = (ok["t"] + ok["duration_s"]).dropna().astype(int)
    per_s = end.value_counts().sort_index()
    ax.bar(per_s.index, per_s.values, width=0.9, label="completed req/s")
    sent = df["t"].dropna().astype(int).value_counts().sort_index()
    ax.step(sent.index, sent.values, where="mid", color="black", linewidth=1, label="started req/s")
    tok = ok.assign(sec=end).groupby("sec")["output_tokens"].sum()
    if tok.sum() > 0:
        ax2 = ax.twinx()
        ax2.plot(tok.index, tok.values, color="tab:green", label="output tokens/s")
        ax2.set_ylabel("tokens/s")
        ax2.legend(fontsize=9, loc="lower right")
    ax.set(title="throughput", xlabel="s since start", ylabel="req/s")
    ax.legend(fontsize=9, loc="upper left")


def _errors(ax, df: pd.DataFrame, slo: dict[str, float]) -> None:
    bad = df[~df["ok"] | (df["status"] == 429)]
    if bad.empty:
        ax.text(0.5, 0.5, "no errors", ha="center", va="center", transform=ax.transAxes)
    else:
        kinds = bad["error_type"].replace("", "other").replace("rate_limited", "429 rate_limited")
        table = pd.crosstab(bad["t"].astype(int), kinds)
        bottom = np.zeros(len(table))
        for kind in table.columns:
            ax.bar(table.index, table[kind].values, bottom=bottom, width=0.9, label=kind)
            bottom += table[kind].values
        ax.legend(fontsize=9)
    ax.set(title="errors by type", xlabel="s since start", ylabel="per s")


def _itl(ax, df: pd.DataFrame, slo: dict[str, float]) -> None:
    gaps = itl_gaps(df)
    if gaps.empty:
        ax.text(0.5, 0.5, "no streamed tokens", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.hist(gaps * 1000, bins=50, color="tab:purple")
    ax.set(title="inter-token latency", xlabel="ms", ylabel="gaps")


def scenario_figure(df: pd.DataFrame, scenario: str, slo: dict[str, float] | None = None) -> str:
    """The six panels for one scenario as a base64 PNG; `slo`: latency objectives in seconds
    (`ttft_p95`, `duration_p90`) drawn as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for fn, ax in zip((_over_time, _percentiles, _histograms, _throughput, _errors, _itl), axes.flat,
                      strict=True):
        fn(ax, df, slo or {})
    fig.suptitle(scenario, fontsize=14)
    fig.tight_layout()
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def all_figures(df: pd.DataFrame, slo: dict[str, dict[str, float]] | None = None) -> dict[str, list[tuple[str, str]]]:
    """scenario -> [(caption, base64 PNG)] for report.html; `slo`: scenario -> objective -> limit (s)."""
    out = {}
    for scenario, part in df.groupby("scenario"):
        fig = scenario_figure(part, str(scenario), (slo or {}).get(str(scenario)))
        out[str(scenario)] = [("latency (dashed: SLO limits), percentiles, TTFT, throughput, errors, ITL", fig)]
    return out


def engine_figure(df: pd.DataFrame, engine: dict) -> str | None:
    """The engine's queue and KV cache over the run beside the client's TTFT (rolling p95), or None
    without samples. `engine`: a scenario summary's `engine` entry (its `series` from the sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = pd.DataFrame(engine.get("series") or [])
    if series.empty:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.5))
    left.plot(series["t_s"], series["waiting"], label="waiting")
    left.plot(series["t_s"], series["running"], label="running")
    left.set(title=f"{engine['engine']}: requests in the engine", xlabel="s since the first sample", ylabel="requests")
    _legend(left)
    if series["kv_usage"].notna().any():
        right.plot(series["t_s"], series["kv_usage"] * 100, color="tab:red", label="KV cache usage %")
    ok = df[df["ok"]].sort_values("t").dropna(subset=["ttft_s"])
    if len(ok):
        twin = right.twinx()
        window = max(1, min(200, len(ok) // 20))
        twin.plot(ok["t"], ok["ttft_s"].rolling(window, min_periods=1).quantile(0.95) * 1000, color="tab:orange",
                  label="client TTFT rolling p95 (ms)")
        twin.set_ylabel("ms")
        twin.legend(fontsize=7, loc="upper right")
    right.set(title="KV cache and client TTFT", xlabel="s since start", ylabel="%")
    _legend(right, loc="upper left")
    fig.tight_layout()
    try:
        return _png(fig)
    finally:
        plt.close(fig)
