"""Sample a model server's own /metrics during a load test (for `opskit loadtest --engine-metrics URL`).

A background thread reads the URL every `interval_s`, recognises the engine by the names it exports
(vLLM, SGLang or TGI, as opskit.core.engine_catalog lists them) and keeps, per sample, the time,
requests waiting and running, and KV-cache usage; `summary()` adds what the run did server-side:
mean server TTFT and queue time (histogram sum and count deltas between the first and last good
sample), preemptions, the peaks, and how many samples failed. It never raises: an endpoint that is
down, answers non-200, or speaks no known engine's names is counted by reason, and `notes()` gives
one line per reason for the report.

The gate (opskit.loadtest.gate) starts one beside each scenario's Locust run and stops it after; its
`summary()` and `series()` go into summary.json (the scenario's `engine`), the report's key numbers
and a plot of the queue and KV cache beside client TTFT, and `report compare` compares them.
"""

from __future__ import annotations

import collections
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from opskit.core import engine_catalog as ec

MAX_BYTES = 16 * 1024 * 1024
# Per engine: the sample names of each quantity (None: the engine does not export it).
QUANTITIES: dict[str, dict[str, str | None]] = {
    ec.VLLM: {"waiting": ec.VLLM_WAITING.name, "running": ec.VLLM_RUNNING.name, "kv": ec.VLLM_KV_USAGE.name,
              "preemptions": ec.VLLM_PREEMPTIONS.name, "ttft": ec.VLLM_TTFT.name, "queue": ec.VLLM_QUEUE.name},
    ec.SGLANG: {"waiting": ec.SGLANG_QUEUE.name, "running": ec.SGLANG_RUNNING.name,
                "kv": ec.SGLANG_TOKEN_USAGE.name, "preemptions": ec.SGLANG_RETRACTED_TOTAL.name,
                "ttft": ec.SGLANG_TTFT.name, "queue": ec.SGLANG_QUEUE_TIME.name},
    ec.TGI: {"waiting": ec.TGI_QUEUE_SIZE.name, "running": ec.TGI_BATCH_SIZE.name, "kv": None,
             "preemptions": None, "ttft": None, "queue": ec.TGI_QUEUE_DURATION.name},
}


@dataclass(frozen=True)
class Snapshot:
    """One good sample: gauges now, and the counters and histogram sums/counts so far."""

    t: float
    engine: str
    values: dict[str, float]     # sample name -> value summed over label sets


class BadSample(Exception):
    """A sample that could not be used; the message is the reason it is counted under."""


def parse(text: str) -> Snapshot:
    """The engine and its quantities from one exposition; BadSample when no known engine speaks."""
    values: dict[str, float] = collections.defaultdict(float)
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if not s.name.endswith("_bucket"):
                    values[s.name] += s.value
    except Exception as exc:  # noqa: BLE001 - a peer's bytes: any parser failure is one counted reason
        raise BadSample("not Prometheus text") from exc
    for engine, q in QUANTITIES.items():
        if q["waiting"] in values and q["running"] in values:
            return Snapshot(time.monotonic(), engine, dict(values))
    raise BadSample("no vLLM, SGLang or TGI series")


def fetch(url: str, timeout: float) -> str:
    """GET the exposition text, bounded in size and time; BadSample naming what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise BadSample(f"HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise BadSample(f"unreachable ({exc.__class__.__name__})") from None
    if len(body) > MAX_BYTES:
        raise BadSample("over 16 MiB")
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise BadSample("not UTF-8 text") from None


class EngineSampler:
    """Samples `url` every `interval_s` on a daemon thread between start() and stop()."""

    def __init__(self, url: str, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        self.url, self.interval_s, self.timeout_s = url, interval_s, timeout_s
        self.snapshots: list[Snapshot] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample now (the thread's step; tests may call it directly)."""
        try:
            snap = parse(fetch(self.url, self.timeout_s))
        except BadSample as exc:
            self.errors[str(exc)] += 1
            return
        if self.snapshots and snap.engine != self.snapshots[0].engine:
            self.errors[f"engine changed from {self.snapshots[0].engine} to {snap.engine}"] += 1
            return
        self.snapshots.append(snap)

    def start(self) -> None:
        """Start sampling in the background."""
        def loop() -> None:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval_s)
        self._thread = threading.Thread(target=loop, name="engine-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop, taking a last sample so that the deltas cover the whole run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + self.interval_s + 1)
        self.sample()

    def series(self) -> list[dict]:
        """Per good sample: seconds since the first, waiting, running, KV usage (None for TGI)."""
        if not self.snapshots:
            return []
        t0, q = self.snapshots[0].t, QUANTITIES[self.snapshots[0].engine]
        return [{"t_s": round(s.t - t0, 3), "waiting": s.values.get(q["waiting"]),
                 "running": s.values.get(q["running"]), "kv_usage": s.values.get(q["kv"]) if q["kv"] else None}
                for s in self.snapshots]

    def summary(self) -> dict:
        """What summary.json carries: engine, peaks, server-side means over the run, errors."""
        out: dict = {"url": self.url, "samples": len(self.snapshots), "errors": dict(self.errors), "engine": None}
        if not self.snapshots:
            return out
        first, last = self.snapshots[0], self.snapshots[-1]
        q = QUANTITIES[first.engine]
        rows = self.series()

        def mean(hist: str | None) -> float | None:
            if not hist:
                return None
            n = last.values.get(f"{hist}_count", 0) - first.values.get(f"{hist}_count", 0)
            return (last.values.get(f"{hist}_sum", 0) - first.values.get(f"{hist}_sum", 0)) / n if n > 0 else None

        kv = [r["kv_usage"] for r in rows if r["kv_usage"] is not None]
        out.update({
            "engine": first.engine, "max_waiting": max(r["waiting"] for r in rows),
            "max_running": max(r["running"] for r in rows), "max_kv_usage": max(kv) if kv else None,
            "server_ttft_mean_s": mean(q["ttft"]), "queue_time_mean_s": mean(q["queue"]),
            "preemptions": (last.values.get(q["preemptions"], 0) - first.values.get(q["preemptions"], 0))
            if q["preemptions"] else None,
        })
        return out

    def notes(self) -> list[str]:
        """One line per kind of failed sample, for the report."""
        return [f"engine metrics {self.url}: {n} sample(s) failed: {reason}" for reason, n in sorted(self.errors.items())]
