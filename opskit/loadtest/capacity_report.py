"""The capacity search's report: one sentence, the levels table, and load-latency curves (TTFT and
duration p50/p95/p99, achieved against offered, error ratio) with the SLO lines. Text for the
terminal, HTML (plots as data URIs) for the run directory."""

from __future__ import annotations

import html as _html

from opskit.loadtest.plots import _png


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


def figure(summary: dict) -> str | None:
    """Three panels against offered load; a base64 PNG, or None when no level ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = summary["levels"]
    if not levels:
        return None
    x = [lv["load"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    obj = summary.get("objectives") or {}
    for col, name, limit in (("ttft_s", "TTFT", obj.get("ttft_p95_seconds")),
                             ("duration_s", "duration", obj.get("duration_p90_seconds"))):
        for q, style in (("p50", ":"), ("p95", "-"), ("p99", "--")):
            ys = [lv[col].get(q) for lv in levels]
            if any(y is not None for y in ys):
                axes[0].plot(x, [None if y is None else y * 1000 for y in ys], style, marker="o", ms=3,
                             label=f"{name} {q}")
        if limit is not None:
            axes[0].axhline(limit * 1000, color="red" if name == "TTFT" else "purple", lw=0.8,
                            label=f"{name} SLO")
    axes[0].set(title="latency against offered load", xlabel=summary["unit"], ylabel="ms", yscale="log")
    axes[0].legend(fontsize=7)
    axes[1].plot(x, [lv["achieved_rps"] for lv in levels], "o-", label="achieved req/s")
    axes[1].plot(x, [lv["goodput_rps"] for lv in levels], "s--", label="goodput req/s")
    if summary["by"] == "rate":
        axes[1].plot(x, x, color="grey", lw=0.8, label="offered")
    axes[1].set(title="throughput", xlabel=summary["unit"], ylabel="req/s")
    axes[1].legend(fontsize=7)
    axes[2].plot(x, [lv["error_ratio"] * 100 for lv in levels], "o-")
    if obj.get("error_ratio") is not None:
        axes[2].axhline(obj["error_ratio"] * 100, color="red", lw=0.8, label="error SLO")
        axes[2].legend(fontsize=7)
    axes[2].set(title="error ratio", xlabel=summary["unit"], ylabel="%")
    for ax in axes:
        if summary.get("max_load"):
            ax.axvline(summary["max_load"], color="green", lw=0.8, ls="--")
    fig.tight_layout()
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def html(summary: dict) -> str:
    """The whole page; every value escaped."""
    esc = _html.escape
    png = figure(summary)
    rows = "".join(
        f"<tr><td>{lv['load']:.4g}</td><td>{lv['requests']}</td><td>{lv['achieved_rps']:.1f}</td>"
        f"<td>{_ms(lv['ttft_s'].get('p95'))}</td><td>{_ms(lv['duration_s'].get('p95'))}</td>"
        f"<td>{lv['error_ratio']:.1%}</td><td>{esc(_attain(lv))}</td>"
        f"<td class={'ok' if lv['passed'] else 'miss'}>{'OK' if lv['passed'] else esc('MISS ' + ', '.join(lv['missed']))}"
        f"</td></tr>" for lv in summary["levels"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>opskit capacity {esc(str(summary.get('run', '')))}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 8px;text-align:right}}
.ok{{color:#070}} .miss{{color:#b00}} h2{{margin-top:1.5em}}</style></head><body>
<h1>Capacity: {esc(summary['sentence'])}</h1>
<p>scenario {esc(summary['scenario'])}, search by {esc(summary['by'])}, target {esc(str(summary.get('target', '')))};
each level ran long enough for {summary.get('min_requests_per_level', '')} requests.</p>
<table><tr><th>load ({esc(summary['unit'])})</th><th>requests</th><th>achieved req/s</th><th>TTFT p95</th>
<th>duration p95</th><th>errors</th><th>attainment (95 % interval)</th><th>verdict</th></tr>{rows}</table>
{f'<img alt="load-latency curves" src="data:image/png;base64,{png}">' if png else '<p>no level ran</p>'}
</body></html>
"""


def _attain(lv: dict) -> str:
    return "; ".join(f"{k} {v['ratio']:.1%} [{v['low']:.1%}, {v['high']:.1%}]" for k, v in lv["attainment"].items())
