"""Helper processes of a load test: the embedded mock, the metering exporter, Locust itself.

Every child runs in its own session (process group) so stopping it also stops what it forked, and it
is always stopped (SIGTERM, then SIGKILL) when the run ends, however it ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from opskit.core import readyfile

OPSKIT = [sys.executable, "-m", "opskit"]


class ProcError(Exception):
    """A helper process could not start; the message is one line."""


def free_port() -> int:
    """A free loopback port (for Locust's master, which cannot report the port it bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.Popen:
    """Start a child in its own process group, output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the child's group, SIGKILL it if it has not gone within `timeout`."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(log: Path, lines: int = 1) -> str:
    """The last non-empty lines of a child's log (for one-line errors)."""
    try:
        text = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def wait_ready(proc: subprocess.Popen, ready: Path, log: Path, what: str, timeout: float = 30.0) -> dict:
    """Wait for a child's JSON ready file; ProcError naming its last log line if it dies or stalls."""
    def exited() -> str | None:
        return None if proc.poll() is None else f"exited with status {proc.returncode}"

    try:
        return readyfile.wait(ready, exited, timeout, poll_s=0.05)
    except readyfile.NotReady as exc:
        stop(proc)
        raise ProcError(f"{what} {exc}: {tail(log) or 'no output'}") from None


def start_mock(run_dir: Path, extra: list[str]) -> tuple[subprocess.Popen, dict]:
    """`opskit mock` on a free loopback port; returns the process and {url, admin_url}."""
    ready = run_dir / "mock-ready.json"
    log = run_dir / "mock.log"
    proc = start([*OPSKIT, "mock", "--listen", "127.0.0.1:0", "--ready-file", str(ready), *extra], log)
    return proc, wait_ready(proc, ready, log, "opskit mock")


def start_exporter(run_dir: Path, upstream: str, config: str | None) -> tuple[subprocess.Popen, dict]:
    """`opskit exporter` with its metering proxy in front of `upstream`; returns {url, proxy_url}."""
    ready = run_dir / "exporter-ready.json"
    log = run_dir / "exporter.log"
    # a short drain: at the end of a run only calls the client already gave up on can be in flight
    argv = [*OPSKIT, "exporter", "--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--upstream", upstream,
            "--no-gpu", "--drain-s", "2", "--ready-file", str(ready)]
    if config:
        argv += ["--config", config]
    proc = start(argv, log)
    info = wait_ready(proc, ready, log, "opskit exporter")
    if not info.get("proxy_url"):
        stop(proc)
        raise ProcError("opskit exporter did not start its proxy")
    return proc, info


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
