"""Small grafanalib helpers shared by the dashboards: each panel helper takes a catalogue entry,
so its unit, description and series name come from opskit.core.catalog and cannot drift.

Queries use the dashboard variables `$target`, `$model`, `$instance`, `$gpu`, `$source` and the scope
variables `$cluster`, `$namespace`, `$job` (multi-value, "All" = `.*`, so they are always matched with
`=~`) and `$__rate_interval`.
"""

from __future__ import annotations

import attr
from grafanalib.core import (
    Annotations,
    Dashboard,
    DashboardLink,
    GridPos,
    RowPanel,
    Stat,
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


# Where a series was scraped: the Kubernetes cluster and namespace (labels a multi-cluster Prometheus or
# the Prometheus Operator adds; absent on a plain Prometheus) and the scrape job. "All" is `.*`, which
# also matches a series without the label, so these variables are harmless where the labels are absent.
SCOPE = ("cluster", "namespace", "job")


def scoped(*labels: str, extra: str = "") -> str:
    """matchers() for the scope variables, then `labels`: every panel of a dashboard with scope
    variables selects through this."""
    return matchers(*SCOPE, *labels, extra=extra)


def scope_variables(metric: Metric) -> list[Template]:
    """Cluster, namespace and job variables over a series every exporter exports, each narrowed by
    the ones before it."""
    return [variable(name, name.capitalize(), metric, matchers(*SCOPE[:i]) if i else "")
            for i, name in enumerate(SCOPE)]


def source_variable(metric: Metric) -> Template:
    """The call source (proxy = the application's calls, probe = canary calls), "proxy" by default so
    canary calls stay out of latency quantiles; where no proxy runs, Grafana falls back to All."""
    return Template(name="source", label="Source", query=f"label_values({metric.name}, source)",
                    dataSource=DATASOURCE, includeAll=True, multi=True, allValue=".*", default="proxy",
                    refresh=2)


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


def stat(title: str, description: str, unit: str, targets: list[Target], steps: list[dict]) -> Stat:
    """A single-number panel (last value, with its sparkline) coloured by threshold `steps`."""
    refs = [attr.evolve(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)]
    return Stat(title=title, description=description, format=unit, targets=refs, dataSource=DATASOURCE,
                thresholds=steps, reduceCalc="lastNotNull", graphMode="area", colorMode="value")


def variable(name: str, label: str, metric: Metric, sel: str = "") -> Template:
    """A multi-value query variable over a label of a catalogue series; All matches everything."""
    return Template(name=name, label=label, query=f"label_values({metric.name}{sel}, {name})",
                    dataSource=DATASOURCE, includeAll=True, multi=True, allValue=".*", default="$__all",
                    refresh=2)


def datasource_variable() -> Template:
    """The Prometheus datasource picker every panel refers to."""
    return Template(name="datasource", label="Data source", query="prometheus", type="datasource",
                    default="Prometheus")


def layout(sections: list[tuple]) -> list:
    """Rows with their panels placed two per line (24 grid columns), top to bottom; a section
    (title, panels, (width, height)) sizes its own panels."""
    out, y = [], 0
    for title, panels, *size in sections:
        width, height = size[0] if size else (12, 8)
        out.append(RowPanel(title=title, gridPos=GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        for i, panel in enumerate(panels):
            x = (i * width) % 24
            out.append(attr.evolve(panel, gridPos=GridPos(h=height, w=width, x=x, y=y)))
            if x + width >= 24 or i == len(panels) - 1:
                y += height
    return out


# Every opskit dashboard carries this tag; the header's "opskit dashboards" menu lists them all.
TAG = "opskit"
ALL_DASHBOARDS = DashboardLink(title="opskit dashboards", type="dashboards", tags=[TAG], asDropdown=True,
                               keepTime=True, includeVars=False, uri="", tooltip="")


def alert_annotations(alerts: str) -> Annotations:
    """Firing alerts whose name matches the regex `alerts`, as annotations on every time series."""
    return Annotations(list=[{
        "datasource": DATASOURCE, "enable": True, "hide": False, "iconColor": "red", "name": "Firing alerts",
        "expr": f'ALERTS{{alertstate="firing",alertname=~"{alerts}"}}', "step": "30s",
        "titleFormat": "{{alertname}}", "tagKeys": "severity,target,gpu", "textFormat": "",
        "useValueForTime": False}])


def dashboard(title: str, uid: str, description: str, variables: list[Template], sections,
              links: list | None = None, alerts: str | None = None) -> Dashboard:
    """A dashboard with ids assigned, shared crosshair and the datasource variable first; `links`
    are grafanalib DashboardLinks shown in its header after the menu of every opskit dashboard;
    `alerts` (a regex of alert names) marks when those fired."""
    return Dashboard(
        title=title, uid=uid, description=description, tags=[TAG], refresh="30s",
        links=[*(links or []), ALL_DASHBOARDS],
        annotations=alert_annotations(alerts) if alerts else Annotations(),
        schemaVersion=SCHEMA_VERSION, graphTooltip=1, timezone="browser",
        templating=Templating(list=[datasource_variable(), *variables]),
        panels=layout(sections),
    ).auto_panel_ids()
