"""Compare two runs (their summary.json): a table of metric changes and a regression verdict. Pandas.

A metric regresses when it gets worse by more than the tolerance: latencies and error ratio going up,
throughput going down. Latencies and throughput use a relative tolerance (default 10 %); the error
ratio an absolute one (default 0.5 percentage points), since relative change of a near-zero ratio means
little. Scenarios present in only one run are listed and not judged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from opskit.core.config import ConfigError

# (metric label, path in a scenario summary, higher_is_better)
METRICS = (
    ("ttft_p50_s", ("ttft_s", "p50"), False), ("ttft_p95_s", ("ttft_s", "p95"), False),
    ("ttft_p99_s", ("ttft_s", "p99"), False), ("duration_p50_s", ("duration_s", "p50"), False),
    ("duration_p90_s", ("duration_s", "p90"), False), ("duration_p99_s", ("duration_s", "p99"), False),
    ("itl_p50_s", ("itl_s", "p50"), False), ("itl_p99_s", ("itl_s", "p99"), False),
    ("tpot_p50_s", ("tpot_s", "p50"), False), ("throughput_rps", ("throughput_rps",), True),
    ("output_tokens_s", ("output_tokens_s",), True), ("error_ratio", ("error_ratio",), False),
    # the engine's own view (--engine-metrics)
    ("server_ttft_mean_s", ("engine", "server_ttft_mean_s"), False),
    ("queue_time_mean_s", ("engine", "queue_time_mean_s"), False),
    ("max_waiting", ("engine", "max_waiting"), False),
    # a capacity search's answer (its summary.json files it as scenario "capacity:<scenario>")
    ("max_load_at_slo", ("max_load",), True), ("goodput_rps", ("goodput_rps",), True),
    ("goodput_tokens_s", ("goodput_tokens_s",), True),
)


RUN_PARTS = ("log", "locust", "mock.log", "exporter.log")  # what a run directory holds before its summary


def load_summary(path: str | Path) -> dict:
    """summary.json of a run directory (or the file itself); ConfigError when unreadable."""
    p = Path(path)
    if p.is_dir():
        if not (p / "summary.json").exists() and any((p / part).exists() for part in RUN_PARTS):
            import click

            raise click.UsageError(f"{p}: this run did not finish (no summary.json: it was stopped or failed "
                                   f"before its verdict, or it is still running); compare finished runs")
        p = p / "summary.json"
    try:
        data = json.loads(p.read_text())
    except OSError as exc:  # e.g. a run that ended with a usage error before writing one
        raise ConfigError(str(p), "", f"a run's summary.json ({exc.strerror or exc.__class__.__name__})") from None
    except ValueError:
        raise ConfigError(str(p), "", "a run's summary.json (it is not valid JSON)") from None
    if not isinstance(data, dict) or not isinstance(data.get("scenarios"), dict):
        raise ConfigError(str(p), "scenarios", "a summary written by opskit loadtest")
    return data


def _get(summary: dict, path: tuple[str, ...]) -> float | None:
    value: object = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def compare(base: dict, new: dict, tolerance: float = 0.10, error_tolerance: float = 0.005) -> pd.DataFrame:
    """One row per (scenario, metric): base, new, change, and whether it regressed."""
    rows = []
    for scenario in sorted(set(base["scenarios"]) & set(new["scenarios"])):
        b, n = base["scenarios"][scenario], new["scenarios"][scenario]
        for label, path, higher_better in METRICS:
            vb, vn = _get(b, path), _get(n, path)
            if vb is None:  # nothing to compare with; a metric the new run lacks is shown, never dropped
                continue
            if vn is None:  # e.g. no call succeeded, or TTFT of a stream that never started: not a pass
                rows.append({"scenario": scenario, "metric": label, "base": vb, "new": None, "change": float("nan"),
                             "regressed": True})
                continue
            rel = (vn - vb) / vb if vb else (0.0 if vn == vb else float("inf"))
            if label == "error_ratio":
                regressed = vn - vb > error_tolerance
            elif higher_better:
                regressed = rel < -tolerance
            else:
                regressed = rel > tolerance
            rows.append({"scenario": scenario, "metric": label, "base": vb, "new": vn, "change": rel,
                         "regressed": bool(regressed)})
    return pd.DataFrame(rows, columns=["scenario", "metric", "base", "new", "change", "regressed"])


def only_in_one(base: dict, new: dict) -> list[str]:
    """Scenarios that only one of the runs has."""
    return sorted(set(base["scenarios"]) ^ set(new["scenarios"]))


def shown(metric: str) -> str:
    """A metric's name as the table shows it: the unit is with the values (`ttft_p50_s` -> `ttft_p50`)."""
    return metric[:-2] if _is_time(metric) else metric


def _is_time(metric: str) -> bool:
    return metric.endswith("_s") and not metric.endswith("tokens_s")


def _fmt(metric: str, v: float | None) -> str:
    if v is None or v != v:
        return "missing"
    if _is_time(metric):
        return f"{v * 1000:.2f} ms"
    if metric == "error_ratio":
        return f"{v * 100:.2f} %"
    return f"{v:.2f}"


def render(table: pd.DataFrame, missing: list[str] | None = None) -> str:
    """The change table and a one-line verdict."""
    if table.empty:
        return "no scenario in common: nothing to compare"
    lines = [f"{'SCENARIO':<13} {'METRIC':<16} {'BASE':>12} {'NEW':>12} {'CHANGE':>9}  RESULT"]
    for r in table.itertuples():
        missing = r.new is None or r.new != r.new
        change = "n/a" if missing or r.change in (float("inf"), float("-inf")) else f"{r.change * 100:+.1f}%"
        result = "MISSING in NEW" if missing else "REGRESSED" if r.regressed else "ok"
        lines.append(f"{r.scenario:<13} {shown(r.metric):<16} {_fmt(r.metric, r.base):>12} "
                     f"{_fmt(r.metric, r.new):>12} {change:>9}  {result}")
    if missing:
        lines.append("only in one run (not compared): " + ", ".join(missing))
    bad = table[table["regressed"]]
    if bad.empty:
        lines.append("COMPARE: no regression")
    else:
        lines.append("COMPARE: REGRESSION in " + ", ".join(f"{r.scenario} {shown(r.metric)}" for r in bad.itertuples()))
    return "\n".join(lines)


def worse_by(row) -> float | None:
    """A row's change as "worse by" (positive: worse), whichever way the metric is better; None when
    there is no finite change to show."""
    change = row.change
    if row.new is None or change != change or change in (float("inf"), float("-inf")):
        return None
    higher_better = next(h for label, _, h in METRICS if label == row.metric)
    if row.metric == "error_ratio":  # judged in points, not relative change
        return (row.new - row.base) * 100
    return -change * 100 if higher_better else change * 100


def changes_chart(table: pd.DataFrame, tolerance: float):
    """"What got worse against the baseline?": one bar per metric, worse to the right, the tolerance
    as a labelled line (charts' style); None when nothing has a finite change."""
    from opskit.loadtest.charts import COLORS, chart

    rows = [(f"{r.scenario} {shown(r.metric)}", w, r.regressed) for r in table.itertuples()
            if (w := worse_by(r)) is not None]
    if not rows:
        return None

    def draw(ax):
        labels, values, bad = zip(*reversed(rows), strict=True)
        ax.barh(range(len(rows)), values, color=[COLORS["slo"] if b else COLORS["expected"] for b in bad])
        ax.set_yticks(range(len(rows)), labels)
        ax.axvline(0, color="black", lw=0.8)
        ax.axvline(tolerance * 100, color=COLORS["slo"], ls="--", lw=1.4)
        ax.annotate(f"tolerance {tolerance * 100:g} %", xy=(tolerance * 100, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", ha="left", va="top", color=COLORS["slo"])
        ax.set_xlim(min(0.0, *values) * 1.15 - 1, max(tolerance * 100, *values) * 1.6 + 1)  # room for the label
        ax.set_xlabel("\u2190 better | worse by % \u2192")

    return chart("What got worse against the baseline?", draw, size=(4.8, 1.2 + 0.24 * len(rows)))


def html_section(table: pd.DataFrame, missing: list[str], tolerance: float, baseline: str) -> str:
    """The comparison as a report section: its chart and its table (each row a block on a phone)."""
    import html as _html

    from opskit.loadtest.report import charts_html

    e = _html.escape
    head = ("scenario", "metric", "base", "new", "change", "result")
    rows = []
    for r in table.itertuples():
        gone = r.new is None or r.new != r.new
        change = "n/a" if gone or r.change in (float("inf"), float("-inf")) else f"{r.change * 100:+.1f}%"
        result = "MISSING in NEW" if gone else "REGRESSED" if r.regressed else "ok"
        cells = (r.scenario, shown(r.metric), _fmt(r.metric, r.base), _fmt(r.metric, r.new), change, result)
        rows.append("<tr>" + "".join(f"<td data-label='{h}'{' class=fail' if v != 'ok' and h == 'result' else ''}>"
                                     f"{e(v)}</td>" for h, v in zip(head, cells, strict=True)) + "</tr>")
    bad = table[table["regressed"]]
    verdict = ("no regression" if bad.empty else "REGRESSION in " + ", ".join(
        f"{r.scenario} {shown(r.metric)}" for r in bad.itertuples()))
    chart = changes_chart(table, tolerance)
    return (f"<h2>Against the baseline</h2><p>{e(baseline)}: {e(verdict)}"
            + (f"; only in one run (not compared): {e(', '.join(missing))}" if missing else "") + ".</p>"
            + charts_html([chart] if chart else [])
            + "<p>Worse by: the relative change, turned so that worse is positive (more latency, less "
              "throughput); the error ratio by percentage points. Red: regressed.</p>"
            + "<div class='wide'><table class='nowrap'><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table></div>")
