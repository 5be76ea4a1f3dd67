"""Configuration files for the local stack's Prometheus and Alertmanager, as plain text.

Pure functions (no I/O), so the generated files are unit-tested and the stack and the drill share
them. Timings are parameters: the drill runs with 1 s scrapes and evaluations and 1 s Alertmanager
grouping so that alerts fire and resolve within seconds; `opskit stack up` uses calmer defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import yaml

SCRAPE_JOB = "opskit"
RECEIVER_NAME = "opskit-webhook"
_DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")


@dataclass(frozen=True)
class Timing:
    """Scrape/evaluation interval (Prometheus) and grouping timers (Alertmanager)."""

    scrape_interval: str = "5s"
    evaluation_interval: str = "5s"
    group_wait: str = "5s"
    group_interval: str = "10s"
    repeat_interval: str = "4h"

    def check(self) -> None:
        """Raise ValueError naming the first field that is not a Prometheus duration."""
        for name, value in self.__dict__.items():
            if not _DURATION.match(value):
                raise ValueError(f"{name}: expected a duration such as 1s or 5m, got {value!r}")


DRILL_TIMING = Timing("1s", "1s", "1s", "1s", "1h")


def host_port(url: str) -> str:
    """`host:port` of an http URL (what Prometheus' static_configs want)."""
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        raise ValueError(f"expected http://HOST:PORT/..., got {url!r}")
    return f"{parts.hostname}:{parts.port}"


ENGINE_JOB = "llm-engine"  # what the engine rules' `job` matcher expects (deploy/podmonitor.yaml names it so)
DCGM_JOB = "dcgm-exporter"  # matched by the dcgm GPU source's default job pattern (.*dcgm.*)


def prometheus_yml(exporter_url: str, alertmanager_url: str, rule_files: list[str], timing: Timing,
                   engine_url: str | None = None, dcgm_url: str | None = None) -> str:
    """prometheus.yml: scrape the exporter (and, when the mock plays a model server, its own /metrics
    as job llm-engine; a dcgm-exporter as job dcgm-exporter), load `rule_files`, send alerts to Alertmanager."""
    path = urlsplit(exporter_url).path.rstrip("/")
    metrics_path = path if path.endswith("/metrics") else path + "/metrics"
    cfg = {
        "global": {
            "scrape_interval": timing.scrape_interval,
            "scrape_timeout": timing.scrape_interval,
            "evaluation_interval": timing.evaluation_interval,
        },
        "rule_files": list(rule_files),
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [host_port(alertmanager_url)]}]}]},
        "scrape_configs": [{
            "job_name": SCRAPE_JOB,
            "metrics_path": metrics_path,
            "static_configs": [{"targets": [host_port(exporter_url)]}],
        }],
    }
    if engine_url:
        cfg["scrape_configs"].append({"job_name": ENGINE_JOB, "metrics_path": "/metrics",
                                      "static_configs": [{"targets": [host_port(engine_url)]}]})
    if dcgm_url:
        cfg["scrape_configs"].append({"job_name": DCGM_JOB, "metrics_path": "/metrics",
                                      "static_configs": [{"targets": [host_port(dcgm_url)]}]})
    return yaml.safe_dump(cfg, sort_keys=False)


def alertmanager_yml(receiver_url: str, timing: Timing, group_by: tuple[str, ...] = ("...",)) -> str:
    """alertmanager.yml: one route to the webhook receiver, resolved notifications included.

    The default `group_by: ['...']` gives each alert (each label set) its own notification, so
    the receiver sees exactly which alert fired or resolved and when.
    """
    cfg = {
        "route": {
            "receiver": RECEIVER_NAME,
            "group_by": list(group_by),
            "group_wait": timing.group_wait,
            "group_interval": timing.group_interval,
            "repeat_interval": timing.repeat_interval,
        },
        "receivers": [{
            "name": RECEIVER_NAME,
            "webhook_configs": [{"url": receiver_url, "send_resolved": True}],
        }],
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def retime_alertmanager(text: str, receiver_url: str, timing: Timing) -> str:
    """A project alertmanager.yml pointed at `receiver_url` with the stack's timers.

    Every receiver is replaced by the local webhook and every route's timers are shortened, so the
    project's routing tree, grouping and inhibitions are exercised as they are.
    """
    cfg = yaml.safe_load(text)
    if not isinstance(cfg, dict) or "route" not in cfg:
        raise ValueError("alertmanager config: expected a mapping with a route")

    def walk(route: dict) -> None:
        for key in ("group_wait", "group_interval", "repeat_interval"):
            if key in route or route is cfg["route"]:
                route[key] = getattr(timing, key)
        for child in route.get("routes", []) or []:
            walk(child)

    walk(cfg["route"])
    # Every receiver (email, Slack, PagerDuty, ...) becomes the local webhook: the stack never
    # notifies the outside world, and the drill sees every notification the tree would send.
    cfg["receivers"] = [{"name": r["name"], "webhook_configs": [{"url": receiver_url, "send_resolved": True}]}
                        for r in cfg.get("receivers", []) or [] if isinstance(r, dict) and "name" in r]
    return yaml.safe_dump(cfg, sort_keys=False)
