"""Build every dashboards/*.dashboard.py into Grafana JSON plus file-provisioning YAML.

Output (sorted keys, stable for diffs): <name>.json and provisioning/{dashboards,datasources}/opskit.yml,
ready for Grafana's /etc/grafana/provisioning; `opskit generate dashboards` writes them under
dashboards/generated/. Other code may call `build_all(thresholds)` and `all_queries()` (every panel
query with its variables filled in, ready to run against a real Prometheus).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml
from grafanalib._gen import DashboardEncoder
from grafanalib.core import Dashboard

from opskit.core import engine_catalog
from opskit.core import thresholds as thresholds_mod
from opskit.core.thresholds import Thresholds
from opskit.opscode.promql import series_names
from opskit.shipped import folder

SUFFIX = ".dashboard.py"
DEFAULT_DASHBOARDS_PATH = "/var/lib/grafana/dashboards/opskit"
DEFAULT_PROMETHEUS_URL = "http://127.0.0.1:9090"
DATASOURCE_NAME = "Prometheus"
# Values that make a query with dashboard variables a plain PromQL query: "All" is `.*`.
INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def _load(path: Path):
    # *.dashboard.py is grafanalib's naming; the dot keeps them out of `import`, so load by path.
    name = f"dashboards._{path.name[:-len(SUFFIX)]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_all(t: Thresholds | None = None) -> dict[str, Dashboard]:
    """Dashboard name (file stem) -> Dashboard built for thresholds `t` (default `thresholds.load()`)."""
    t = t or thresholds_mod.load()
    return {p.name[:-len(SUFFIX)]: _load(p).build(t) for p in sorted(folder("dashboards").glob(f"*{SUFFIX}"))}


def to_json(d: Dashboard) -> str:
    """The dashboard JSON, keys sorted, as Grafana imports it."""
    return json.dumps(d.to_json_data(), sort_keys=True, indent=2, cls=DashboardEncoder) + "\n"


def provisioning(dashboards_path: str = DEFAULT_DASHBOARDS_PATH,
                 prometheus_url: str = DEFAULT_PROMETHEUS_URL) -> dict[str, str]:
    """Grafana file-provisioning YAML: a dashboard provider reading `dashboards_path` (where the
    generated JSON is mounted) and the Prometheus datasource the dashboards' variable defaults to."""
    provider = {"apiVersion": 1, "providers": [{
        "name": "opskit", "folder": "opskit", "type": "file", "disableDeletion": False,
        "allowUiUpdates": False, "updateIntervalSeconds": 30, "options": {"path": dashboards_path},
    }]}
    datasource = {"apiVersion": 1, "datasources": [{
        "name": DATASOURCE_NAME, "uid": "opskit-prometheus", "type": "prometheus", "access": "proxy",
        # never the default: provisioned into an existing Grafana, it must not take over the default
        # datasource of every other dashboard there (the dashboards pick it by name)
        "url": prometheus_url, "isDefault": False, "jsonData": {"timeInterval": "15s"},
    }]}
    dump = lambda data: yaml.safe_dump(data, sort_keys=True)  # noqa: E731
    return {"provisioning/dashboards/opskit.yml": dump(provider),
            "provisioning/datasources/opskit.yml": dump(datasource)}


def outputs(t: Thresholds | None = None, **prov) -> dict[str, str]:
    """Relative path under generated/ -> content, for everything `make dashboards` writes."""
    files = {f"{name}.json": to_json(d) for name, d in build_all(t).items()}
    files.update(provisioning(**prov))
    return files


def substitute(expr: str) -> str:
    """A panel query with Grafana variables replaced: $__rate_interval -> 5m, others -> `.*`."""
    return _VAR.sub(lambda m: INTERVALS.get(m.group(1) or m.group(2), ".*"), expr)


def panels(d: Dashboard) -> list:
    """Every panel of a dashboard that runs queries."""
    return [p for p in d._iter_panels() if getattr(p, "targets", None)]


def all_queries(t: Thresholds | None = None, engine_panels: bool = True) -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, PromQL with variables substituted) for every panel query;
    `engine_panels=False` leaves out the queries that read only model-server series (for a
    Prometheus that scrapes no engine)."""
    out = [(d.title, p.title, substitute(target.expr))
           for d in build_all(t).values() for p in panels(d) for target in p.targets]
    if not engine_panels:
        engine = engine_catalog.all_series()
        out = [q for q in out if not series_names(q[2]) <= engine]
    return out

