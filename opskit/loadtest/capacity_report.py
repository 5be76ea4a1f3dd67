"""The capacity search's report: one sentence, the levels table, and a chart per question in the
load-test report's style (`charts`): how latency grows with offered load (TTFT and duration
p50/p95/p99 against their SLO lines), whether achieved throughput follows it, and where errors start.
Text for the terminal, HTML (inline SVG) for the run directory."""

from __future__ import annotations

import html as _html

from opskit.loadtest.charts import COLORS, Chart, chart, latency_scale, legend, ms_label, slo_line
from opskit.loadtest.report import CSS, charts_html


def render(summary: dict) -> str:
    """The terminal lines: one per level, then the answer."""
    unit = summary["unit"]
    lines = [f"{'load':>9} {'requests':>8} {'achieved':>9} {'TTFT p95':>9} {'dur p95':>9} {'errors':>7}  verdict"]
    for lv in summary["levels"]:
        ttft, dur = lv["ttft_s"].get("p95"), lv["duration_s"].get("p95")
        lines.append(f"{lv['load']:>9.4g} {lv['requests']:>8} {lv['achieved_rps']:>9.1f} "
                     f"{_ms(ttft):>9} {_ms(dur):>9} {lv['error_ratio']:>7.1%}  "
                     f"{'OK' if lv['passed'] else 'MISS ' + ', '.join(lv['missed'])}")
    lines.append(f"CAPACITY ({summary['scenario']}, by {summary['by']}): {summary['sentence']}")
    if summary.get("goodput_rps") is not None:
        lines.append(f"goodput at that load: {summary['goodput_rps']:.1f} req/s, "
                     f"{summary['goodput_tokens_s']:.0f} output tokens/s ({unit})")
    if summary.get("knee"):
        k = summary["knee"]
        lines.append(f"knee: latency starts to climb near {k['load']:g} {unit} "
                     f"({k['achieved_rps']:.1f} req/s achieved, duration p95 {_ms(k['duration_p95_s'])})")
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def _max_load(ax, summary: dict) -> None:
    """The answer as a vertical line, labelled on the line."""
    if summary.get("max_load"):
        x = summary["max_load"]
        ax.axvline(x, color=COLORS["ok"], lw=1.2, ls="--")
        ax.annotate(f"max at SLO {x:g}", xy=(x, 1), xycoords=("data", "axes fraction"), xytext=(-3, -3),
                    textcoords="offset points", ha="right", va="top", rotation=90, color=COLORS["ok"], fontsize=9.5)


def latency_chart(summary: dict) -> Chart | None:
    """TTFT and duration percentiles against offered load, each objective a labelled line."""
    levels, obj = summary["levels"], summary.get("objectives") or {}
    x = [lv["load"] for lv in levels]

    def draw(ax):
        values = []
        for col, name, color in (("ttft_s", "TTFT", COLORS["ttft"]), ("duration_s", "duration", COLORS["duration"])):
            for q, style in (("p50", ":"), ("p95", "-"), ("p99", "--")):
                ys = [None if lv[col].get(q) is None else lv[col][q] * 1000 for lv in levels]
                if any(y is not None for y in ys):
                    ax.plot(x, [float("nan") if y is None else y for y in ys], style, marker="o", ms=3, color=color,
                            label=f"{name} {q}")
                    values += [y for y in ys if y is not None]
        limits = [(obj.get("ttft_p95_seconds"), "TTFT p95", COLORS["ttft"], True),
                  (obj.get("duration_p90_seconds"), "duration p90", COLORS["duration"], False)]
        # load-latency curves span orders of magnitude once past the knee: always a log axis
        latency_scale(ax, values, [lim * 1000 for lim, *_ in limits if lim is not None], log=True)
        for lim, label, color, right in limits:
            if lim is not None:
                slo_line(ax, lim * 1000, f"SLO {label} < {ms_label(lim)}", color=color, right=right)
        _max_load(ax, summary)
        ax.set_xlabel(f"offered load ({summary['unit']})")
        legend(ax)

    return chart("How does latency grow with the offered load?", draw, size=(4.8, 3.8)) if levels else None


def throughput_chart(summary: dict) -> Chart | None:
    """Achieved and good (within-SLO) requests per second against offered load."""
    levels = summary["levels"]
    x = [lv["load"] for lv in levels]

    def draw(ax):
        ax.plot(x, [lv["achieved_rps"] for lv in levels], "o-", color=COLORS["duration"], label="achieved req/s")
        ax.plot(x, [lv["goodput_rps"] for lv in levels], "s--", color=COLORS["ok"], label="goodput req/s (within SLO)")
        if summary["by"] == "rate":
            ax.plot(x, x, color=COLORS["asked"], lw=1, label="offered")
        _max_load(ax, summary)
        ax.set_ylim(bottom=0)
        ax.set(xlabel=f"offered load ({summary['unit']})", ylabel="req/s")
        legend(ax)

    return chart("Does achieved throughput follow the offered load?", draw) if levels else None


def errors_chart(summary: dict) -> Chart | None:
    """The error ratio per level against its objective."""
    levels, limit = summary["levels"], (summary.get("objectives") or {}).get("error_ratio")
    x = [lv["load"] for lv in levels]

    def draw(ax):
        ys = [lv["error_ratio"] * 100 for lv in levels]
        ax.plot(x, ys, "o-", color=COLORS["slo"], label="errors %")
        if limit is not None:
            slo_line(ax, limit * 100, f"SLO errors < {limit * 100:g} %")
        ax.set_ylim(0, max([*ys, (limit or 0) * 100, 1.0]) * 1.2)
        _max_load(ax, summary)
        ax.set(xlabel=f"offered load ({summary['unit']})", ylabel="% of calls")
        legend(ax)

    return chart("At what load do errors start?", draw) if levels else None


def charts(summary: dict) -> list[Chart]:
    """The report's charts, one question each (none when no level ran)."""
    return [c for fn in (latency_chart, throughput_chart, errors_chart) if (c := fn(summary)) is not None]


def html(summary: dict) -> str:
    """The whole page; every value escaped."""
    esc = _html.escape
    found = charts(summary)
    head = (f"load ({summary['unit']})", "requests", "achieved req/s", "TTFT p95", "duration p95", "errors",
            "attainment (95 % interval)", "verdict")
    rows = "".join(
        "<tr>" + "".join(f"<td data-label='{esc(h)}'{cls}>{esc(v)}</td>" for h, (v, cls) in zip(head, (
            (f"{lv['load']:.4g}", ""), (str(lv["requests"]), ""), (f"{lv['achieved_rps']:.1f}", ""),
            (_ms(lv["ttft_s"].get("p95")), ""), (_ms(lv["duration_s"].get("p95")), ""),
            (f"{lv['error_ratio']:.1%}", ""), (_attain(lv), ""),
            ("OK", " class='pass'") if lv["passed"] else ("MISS " + ", ".join(lv["missed"]), " class='fail'")),
            strict=True)) + "</tr>" for lv in summary["levels"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>opskit capacity {esc(str(summary.get('run', '')))}</title>
<meta name='viewport' content='width=device-width,initial-scale=1'>
<style>{CSS}</style></head><body>
<h1>Capacity: {esc(summary['sentence'])}</h1>
<p class='verdict'>scenario {esc(summary['scenario'])}, search by {esc(summary['by'])}, target {esc(str(summary.get('target', '')))};
each level ran long enough for {summary.get('min_requests_per_level', '')} requests.</p>
<table class='stack'><tr>{"".join(f"<th>{esc(h)}</th>" for h in head)}</tr>{rows}</table>
{charts_html(found) if found else '<p>no level ran</p>'}
</body></html>
"""


def _attain(lv: dict) -> str:
    return "; ".join(f"{k} {v['ratio']:.1%} [{v['low']:.1%}, {v['high']:.1%}]" for k, v in lv["attainment"].items())
