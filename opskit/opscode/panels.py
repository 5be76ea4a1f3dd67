"""Small grafanalib helpers shared by the dashboards: each panel helper takes a catalogue entry,
so its unit, description and series name come from opskit.core.catalog and cannot drift.

Queries use the dashboard variables `$target`, `$model`, `$instance`, `$gpu` (multi-value, "All" =
`.*`, so they are always matched with `=~`) and `$__rate_interval`.
"""

from __future__ import annotations

import attr
from grafanalib.core import (
    Dashboard,
    GridPos,
    RowPanel,
    Target,
    Template,
    Templating,
    TimeSeries,
)

from opskit.core.catalog import Metric

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
# Grafana >= 9 reads datasource references by uid; older schema versions get migrated on load.
SCHEMA_VERSION = 37
# Catalogue unit -> Grafana unit id.
UNITS = {"seconds": "s", "bytes": "bytes", "ratio": "percentunit", "celsius": "celsius", "watts": "watt"}


def unit_of(metric: Metric) -> str:
    """Grafana unit of a catalogue entry's values (counters are shown as per-second rates)."""
    if metric.unit in UNITS:
        return UNITS[metric.unit]
    return "reqps" if metric.name.endswith("_requests_total") else "short"


def matchers(*labels: str, extra: str = "") -> str:
    """A label-matcher block for dashboard variables: matchers("target", "model") ->
    {target=~"$target",model=~"$model"}; `extra` adds literal matchers."""
    parts = [f'{name}=~"${name}"' for name in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}"


def target(expr: str, legend: str, ref: str = "A") -> Target:
    """A Prometheus query of the panel's datasource."""
    return Target(expr=expr, legendFormat=legend, refId=ref, datasource=DATASOURCE)


def threshold_steps(*lines: tuple[str, float]) -> list[dict]:
    """Grafana threshold steps: green below, then (color, value) for each line, ascending."""
    return [{"color": "green", "value": None}] + [{"color": c, "value": v} for c, v in lines]


def timeseries(title: str, description: str, unit: str, targets: list[Target],
               lines: tuple[tuple[str, float], ...] = (), **kw) -> TimeSeries:
    """A time-series panel; `lines` draws dashed threshold lines (e.g. the alert threshold)."""
    refs = [attr.evolve(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)]
    return TimeSeries(title=title, description=description, unit=unit, targets=refs, dataSource=DATASOURCE,
                      thresholds=threshold_steps(*lines), thresholdsStyleMode="dashed" if lines else "off",
                      legendDisplayMode="table", legendCalcs=["mean", "max", "lastNotNull"],
                      maxDataPoints=None, **kw)


def rate_panel(metric: Metric, title: str, by: str, sel: str, legend: str, *, unit: str | None = None,
               description: str = "") -> TimeSeries:
    """Per-second rate of a counter, summed `by` the given labels."""
    expr = f"sum by ({by}) (rate({metric.name}{sel}[{RATE}]))"
    return timeseries(title, description or f"Per-second rate. {metric.help}", unit or unit_of(metric),
                      [target(expr, legend)])


def quantile_panel(metric: Metric, title: str, quantiles: tuple[float, ...], sel: str, *,
                   line: float | None = None, by: str = "target, model") -> TimeSeries:
    """Quantiles of a histogram per `by`, with the alert threshold drawn as a line."""
    targets = [
        target(f"histogram_quantile({q:g}, sum by ({by}, le) (rate({metric.name}_bucket{sel}[{RATE}])))",
               f"p{q * 100:g} " + " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(",")))
        for q in quantiles
    ]
    qs = "/".join(f"p{q * 100:g}" for q in quantiles)
    desc = f"{qs} over {RATE}. {metric.help}"
    if line is not None:
        desc += f" The line is the alert threshold ({line:g} s)."
    lines = (("red", line),) if line is not None else ()
    return timeseries(title, desc, unit_of(metric), targets, lines)


def gauge_panel(metric: Metric, title: str, sel: str, legend: str, *, line: float | None = None,
                unit: str | None = None, description: str = "") -> TimeSeries:
    """A gauge as it is, one line per series."""
    lines = (("red", line),) if line is not None else ()
    return timeseries(title, description or metric.help, unit or unit_of(metric),
                      [target(f"{metric.name}{sel}", legend)], lines)


def variable(name: str, label: str, metric: Metric, sel: str = "") -> Template:
    """A multi-value query variable over a label of a catalogue series; All matches everything."""
    return Template(name=name, label=label, query=f"label_values({metric.name}{sel}, {name})",
                    dataSource=DATASOURCE, includeAll=True, multi=True, allValue=".*", default="$__all",
                    refresh=2)


def datasource_variable() -> Template:
    """The Prometheus datasource picker every panel refers to."""
    return Template(name="datasource", label="Data source", query="prometheus", type="datasource",
                    default="Prometheus")


def layout(sections: list[tuple[str, list]], width: int = 12, height: int = 8) -> list:
    """Rows with their panels placed two per line (24 grid columns), top to bottom."""
    out, y = [], 0
    for title, panels in sections:
        out.append(RowPanel(title=title, gridPos=GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        for i, panel in enumerate(panels):
            x = (i * width) % 24
            out.append(attr.evolve(panel, gridPos=GridPos(h=height, w=width, x=x, y=y)))
            if x + width >= 24 or i == len(panels) - 1:
                y += height
    return out


def dashboard(title: str, uid: str, description: str, variables: list[Template], sections,
              links: list | None = None) -> Dashboard:
    """A dashboard with ids assigned, shared crosshair and the datasource variable first; `links`
    are grafanalib DashboardLinks shown in its header."""
    return Dashboard(
        title=title, uid=uid, description=description, tags=["opskit"], refresh="30s", links=links or [],
        schemaVersion=SCHEMA_VERSION, graphTooltip=1, timezone="browser",
        templating=Templating(list=[datasource_variable(), *variables]),
        panels=layout(sections),
    ).auto_panel_ids()
