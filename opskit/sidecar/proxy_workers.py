"""`--proxy-workers N`: N processes serve the metering proxy's port; the exporter keeps one /metrics.

The exporter process keeps /metrics, the GPU collector and the probers; it reserves the proxy port
(a socket bound with SO_REUSEPORT and never listening, so the port stays the exporter's while workers
come and go) and starts N workers (opskit.sidecar.proxy_worker), each listening on that port with
SO_REUSEPORT: the kernel spreads new connections over them. Each worker counts into its own shared
segment (opskit.sidecar.shared_counts), which the exporter merges into its registry at every scrape.

A worker that exits is started again on the same segment (opskit.core.processes' Backoff: at once
after a long run, with growing delays when it keeps failing), so its counts are neither lost nor
counted twice; what a crash does lose is in shared_counts. Connections waiting in a dead worker's
accept queue are reset by the kernel; new connections go to the workers that live. Workers stop
with the exporter: SIGTERM on close (each drains its calls), and EOF on their stdin if the exporter
itself dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

from opskit.core import catalog, processes
from opskit.sidecar.shared_counts import Merger, Segment, series_name

log = logging.getLogger("opskit.sidecar.exporter")

READY_TIMEOUT_S = 30.0


class WorkerError(OSError):
    """The proxy workers could not be started (one line)."""


def available_cpus(affinity: set[int] | None = None, cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2 `cpu.max`,
    v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up; at least 1."""
    n = len(affinity if affinity is not None else os.sched_getaffinity(0))
    quota = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        q, period = (cgroup / "cpu.max").read_text().split()[:2]
        quota = None if q == "max" else int(q) / int(period)
    if quota is None:
        with contextlib.suppress(OSError, ValueError):
            q = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            if q > 0:
                quota = q / int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    if quota is not None and quota > 0:
        n = min(n, math.ceil(quota))
    return max(1, n)


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT that never listens: it holds the port. A port
    already in use fails here, even by another process's SO_REUSEPORT group (a second exporter on the
    same port must not silently share its traffic)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    if port:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no owner
            probe.bind(addr)  # OSError (address in use) when anyone holds the port
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


class WorkerPool:
    """N proxy worker processes on one port, restarted when they exit; `merge()` at each scrape."""

    def __init__(self, n: int, host: str, port: int, orders: dict, metrics: dict[str, object]) -> None:
        self.n, self.host, self.orders = n, host, orders
        self.port = port
        self.segments = [Segment.create(f"opskit-proxy-worker-{i}") for i in range(n)]
        self.merger = Merger(self.segments, metrics)
        self.procs: list = [None] * n
        self.restarts = 0
        self._sock: socket.socket | None = None
        self._watchers: list[asyncio.Task] = []
        self._closing = False

    @property
    def finished_calls(self) -> int:
        """Metered calls the workers counted so far (each once): their requests counters summed."""
        return int(self.merger.total(series_name(catalog.LLM_REQUESTS)))

    def merge(self) -> int:
        """Put every worker's counts into the exporter's registry (call before rendering it); returns the
        metered calls in them, from the same read."""
        return int(self.merger.merge(series_name(catalog.LLM_REQUESTS)))

    async def start(self) -> None:
        """Reserve the port, start every worker and wait until each serves. OSError (WorkerError for a
        worker that failed) otherwise, with whatever started stopped again."""
        self._sock = _reserve(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        try:
            for i in range(self.n):
                self._spawn(i)
            for i in range(self.n):
                await self._ready(i)
        except BaseException:
            await self.close(0)
            raise
        self._watchers = [asyncio.create_task(self._watch(i), name=f"proxy-worker-{i}") for i in range(self.n)]

    def _spawn(self, i: int) -> None:
        seg = self.segments[i]
        seg.before_start()
        orders = json.dumps({**self.orders, "index": i, "fd": seg.fd, "port": self.port}).encode() + b"\n"
        argv = [sys.executable, "-m", "opskit.sidecar.proxy_worker"]
        try:
            self.procs[i] = (processes.start_attached(argv, orders, pass_fds=(seg.fd,)), time.monotonic())
        except processes.SuperviseError as exc:
            raise WorkerError(f"proxy worker {i}: {exc}") from None

    async def _ready(self, i: int) -> None:
        proc, _ = self.procs[i]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.segments[i].pid != proc.pid:
            if proc.poll() is not None:
                raise WorkerError(f"proxy worker {i} exited with status {proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise WorkerError(f"proxy worker {i} did not serve within {READY_TIMEOUT_S:g}s")
            await asyncio.sleep(0.02)

    async def _watch(self, i: int) -> None:
        """Start worker i again whenever it exits, until close()."""
        backoff = processes.Backoff()
        while True:
            proc, started = self.procs[i]
            code = await processes.wait_exit(proc)
            if self._closing:
                return
            proc.stdin.close()
            delay = backoff.after(time.monotonic() - started)
            log.warning("proxy worker %d (pid %d) exited with status %s: starting it again%s", i, proc.pid, code,
                        f" in {delay:g}s" if delay else "")
            await asyncio.sleep(delay)
            if self._closing:
                return
            self.restarts += 1
            try:
                self._spawn(i)
                await self._ready(i)
            except WorkerError as exc:
                log.error("%s", exc)

    async def close(self, grace_s: float) -> None:
        """Stop every worker: SIGTERM (each drains its calls for up to `grace_s`), SIGKILL after that."""
        self._closing = True
        for task in self._watchers:
            task.cancel()
        live = [p for p, _ in filter(None, self.procs) if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if live:
            waits = [asyncio.ensure_future(processes.wait_exit(p)) for p in live]
            _, pending = await asyncio.wait(waits, timeout=grace_s + 10)
            for proc in live:
                if proc.poll() is None:
                    proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for proc, _ in filter(None, self.procs):
            if proc.stdin is not None:
                proc.stdin.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def release(self) -> None:
        """Unmap the shared segments (after the last scrape)."""
        for seg in self.segments:
            seg.close()
        self.segments = []
