"""The circuit breaker of a load-test run: stop a scenario whose errors pass a threshold.

A target that fails most calls (down behind a gateway, overloaded, misconfigured half way through)
would otherwise take the full load for the whole run. Every second the runner feeds the breaker
Locust's cumulative counts (all requests, failures by error type); when the errors over the last
`window_s` seconds, other than the types the scenario expects (throttling's 429s), reach `ratio` of
the requests in that window, it opens and the run stops: "reach" meaning the lower bound of the share's
Wilson interval (z=3), so 50 % errors open it after ~20 calls while a run at 14 % does not open it by
chance, and the window must hold at least `min_requests`. Threshold and window: opskit.core.thresholds (circuit_error_ratio, circuit_window_s).
"""

from __future__ import annotations

import csv
import math
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from opskit.core import records

# how users.report() names a failure to Locust: "<error_type> (HTTP <status>)"
FAILURE = re.compile(r"(\w+) \(HTTP (\d+)\)")


@dataclass
class Breaker:
    """Feed it cumulative counts with `observe`; it answers the reason once it opens."""

    ratio: float
    window_s: float
    min_requests: int = 20
    ignore: frozenset[str] = frozenset()
    z: float = 3.0  # how sure: opens when the error share's Wilson lower bound (z=3: 99.9 %) passes `ratio`
    samples: deque = field(default_factory=lambda: deque([(0.0, 0, {})]))

    @classmethod
    def for_scenario(cls, scenario: str, thresholds) -> Breaker | None:
        """The breaker for a scenario from Thresholds; None when turned off (ratio >= 1 or window 0)."""
        if thresholds.circuit_error_ratio >= 1 or thresholds.circuit_window_s <= 0:
            return None
        ignore = frozenset({records.RATE_LIMITED}) if scenario == "throttling" else frozenset()
        return cls(thresholds.circuit_error_ratio, thresholds.circuit_window_s,
                   int(thresholds.circuit_min_requests), ignore)

    def observe(self, t: float, total: int, errors: dict[str, int]) -> tuple[str, float] | None:
        """Counts at `t` seconds into the scenario; (reason, error ratio) when the circuit opens."""
        self.samples.append((t, total, dict(errors)))
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.window_s:
            self.samples.popleft()  # keep the newest sample at or before the window's start as the base
        _, base_total, base_err = self.samples[0]
        n = total - base_total
        bad = {k: v - base_err.get(k, 0) for k, v in errors.items() if k not in self.ignore}
        bad = {k: v for k, v in bad.items() if v > 0}
        if n < self.min_requests or not bad:
            return None
        share = min(1.0, sum(bad.values()) / n)
        if wilson_low(share, n, self.z) < self.ratio:  # a handful of unlucky calls must not stop a healthy run
            return None
        types = ", ".join(f"{k} {v}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1]))
        return (f"stopped: circuit open after {t:.0f} s, {100 * share:.0f} % errors ({types}) over the last "
                f"{min(t, self.window_s):.0f} s; threshold {100 * self.ratio:g} %"), share


def wilson_low(p: float, n: int, z: float) -> float:
    """The lower end of the Wilson score interval of a share p observed over n trials."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    return max(0.0, centre - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom)


def read_counts(prefix: Path) -> tuple[int, dict[str, int]] | None:
    """All requests so far and failures by error type, from Locust's stats and failures CSVs; None before
    Locust wrote them."""
    try:
        with open(str(prefix) + "_stats.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("Name") == "Aggregated"]
        with open(str(prefix) + "_failures.csv", newline="") as fh:
            failures = list(csv.DictReader(fh))
    except OSError:
        return None
    if not rows:
        return None
    total = int(float(rows[-1].get("Request Count") or 0))
    errors: dict[str, int] = {}
    for r in failures:
        m = FAILURE.search(r.get("Error") or "")
        kind = m.group(1) if m else "other"
        errors[kind] = errors.get(kind, 0) + int(float(r.get("Occurrences") or 0))
    return total, errors
