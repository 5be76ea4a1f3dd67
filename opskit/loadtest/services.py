"""The services a load test runs beside Locust: the embedded mock and the metering exporter, and
the admin and metrics calls the gate makes to them.

They are started and stopped with opskit.core.processes (own session, group TERM then KILL), always
stopped when the run ends, however it ends.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from opskit.core import processes
from opskit.core.processes import Child, SuperviseError
from opskit.loadtest import placement

OPSKIT = [sys.executable, "-m", "opskit"]


def _start(name: str, argv: list[str], run_dir: Path, into: list[Child],
           cpus: frozenset[int] | None = None) -> tuple[Child, dict]:
    """Start a helper detached, listed in `into` at once (the list its caller stops: one started but not
    yet listed outlived an interrupted run), confined to `cpus` when given, and wait for its ready file;
    SuperviseError naming its last log line."""
    ready = run_dir / f"{name}-ready.json"
    child, proc = processes.spawn(f"opskit {name}", [*argv, "--ready-file", str(ready)], run_dir / f"{name}.log",
                                  into=into)
    placement.pin(proc.pid, cpus)
    try:
        return child, processes.wait_ready_file(child, proc, ready, timeout=30.0)
    except SuperviseError:
        processes.stop(child)
        raise


def start_mock(run_dir: Path, extra: list[str], into: list[Child],
               cpus: frozenset[int] | None = None) -> tuple[Child, dict]:
    """`opskit mock` on a free loopback port, listed in `into` (on `cpus` when given); returns the child
    and {url, admin_url}."""
    return _start("mock", [*OPSKIT, "mock", "--listen", "127.0.0.1:0", *extra], run_dir, into, cpus)


def start_exporter(run_dir: Path, upstream: str, config: str | None, into: list[Child],
                   cpus: frozenset[int] | None = None) -> tuple[Child, dict]:
    """`opskit exporter` with its metering proxy in front of `upstream`, listed in `into` (on `cpus` when
    given); returns the child and {url, proxy_url}."""
    # a short drain: at the end of a run only calls the client already gave up on can be in flight;
    # no linger: the gate has scraped its counts before it stops the exporter
    argv = [*OPSKIT, "exporter", "--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--upstream", upstream,
            "--no-gpu", "--drain-s", "2", "--metrics-linger-s", "0"]
    if config:
        argv += ["--config", config]
    child, info = _start("exporter", argv, run_dir, into, cpus)
    if not info.get("proxy_url"):
        processes.stop(child)
        raise SuperviseError("opskit exporter did not start its proxy")
    return child, info


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 5.0) -> dict:
    """A small JSON request to an admin endpoint (loopback only)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


def requests_by_code(metrics_url: str, timeout: float = 5.0) -> dict[str, float]:
    """opskit_llm_requests_total from the exporter, summed by `code`, plus "in_flight": calls not ended yet."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url.rstrip("/") + "/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "opskit_llm_requests_total":
                code = s.labels.get("code", "")
                out[code] = out.get(code, 0.0) + s.value
            elif s.name == "opskit_llm_requests_in_flight":
                out["in_flight"] = out.get("in_flight", 0.0) + s.value
    return out
