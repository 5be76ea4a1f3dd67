"""A Locust process watching itself: how late its event loop wakes a sleeping greenlet (its own lag)
and how long the OS kept it waiting for a CPU (time stolen by other processes), written at the end
of a scenario to `log/lag-<scenario>-<worker>.json` (results.client_lag reads it).

Reads are stamped with the kernel's receive time (opskit.loadtest.stamped), so the lag no longer adds
to the TTFT and ITL measured; it still delays the sends of closed-loop users and shows how much of a
core the process has to spare: a lag that grows means the process cannot keep up with its streams.
"""

from __future__ import annotations

import collections
import json
import time

import gevent

perf = time.perf_counter
LAG: collections.deque[float] = collections.deque(maxlen=360_000)  # the last hour of 10 ms samples


def schedstat() -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of this process's main thread, from
    /proc/self/schedstat; None where there is no such file."""
    try:
        with open("/proc/self/schedstat") as fh:
            run_ns, wait_ns, _ = fh.read().split()
    except (OSError, ValueError):
        return None
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


class LoopWatch:
    """Samples the loop's lag every `interval` s in a greenlet, from start() on."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.sched0 = schedstat()

    def start(self) -> None:
        """Spawn the sampling greenlet."""
        gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            t = perf()
            gevent.sleep(self.interval)
            LAG.append(perf() - t - self.interval)

    def summary(self) -> dict | None:
        """Lag p50/p99/max (s) and the CPU time used and waited for since creation; None before a sample."""
        if not LAG:
            return None
        lag = sorted(LAG)
        pick = lambda q: lag[min(len(lag) - 1, int(q * len(lag)))]  # noqa: E731
        out = {"samples": len(lag), "p50": pick(0.5), "p99": pick(0.99), "max": lag[-1]}
        now = schedstat()
        if now is not None and self.sched0 is not None:
            out.update(cpu_s=now[0] - self.sched0[0], cpu_wait_s=now[1] - self.sched0[1])
        return out

    def write(self, path: str) -> None:
        """Write summary() as JSON to `path` (nothing before the first sample)."""
        data = self.summary()
        if data is not None:
            with open(path, "w") as fh:
                json.dump(data, fh)
