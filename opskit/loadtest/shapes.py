"""Arrival schedules for open-loop load, and the back-off clients use when throttled. Pure code.

Open loop: requests are sent at times fixed in advance, whatever the target does, so a slow target
meets the same offered rate (no coordinated omission) and latency is measured from each request's
scheduled time. With N Locust processes each one takes every N-th arrival of the fixed schedule
(phase-shifted, so together they make the exact rate), or an independent Poisson stream at rate/N
(the superposition of Poisson streams is a Poisson stream at the summed rate).
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

KINDS = ("fixed", "poisson", "ramp")


@dataclass(frozen=True)
class ArrivalSpec:
    """Offered load: `rate` requests/s in total; `ramp` climbs in `steps` equal steps up to `rate`."""

    kind: str = "fixed"
    rate: float = 10.0
    steps: int = 4
    seed: int = 1


def _step_rates(spec: ArrivalSpec, duration: float) -> list[tuple[float, float, float]]:
    """(start, end, rate) of each constant-rate segment."""
    if spec.kind != "ramp" or duration == float("inf"):  # an endless run cannot ramp to its end
        return [(0.0, duration, spec.rate)]
    n = max(1, spec.steps)
    width = duration / n
    return [(j * width, (j + 1) * width, spec.rate * (j + 1) / n) for j in range(n)]


def arrivals(spec: ArrivalSpec, duration: float, worker: int = 0, workers: int = 1) -> Iterator[float]:
    """Send times, in seconds from the start, of this worker's share of the schedule."""
    if spec.kind not in KINDS:
        raise ValueError(f"arrival kind must be one of {', '.join(KINDS)}")
    if spec.rate <= 0:
        return
    rng = random.Random(spec.seed * 1000 + worker)
    for start, end, rate in _step_rates(spec, duration):
        if spec.kind == "poisson":
            t = start + rng.expovariate(rate / workers)
            while t < end:
                yield t
                t += rng.expovariate(rate / workers)
            continue
        k = 0
        while True:
            # absolute positions (not accumulated gaps) so float error does not drift the rate
            t = start + (k * workers + worker) / rate
            if t >= end:
                break
            yield t
            k += 1


def expected_count(spec: ArrivalSpec, duration: float) -> float:
    """How many requests the whole schedule offers over `duration` (all workers together)."""
    return sum((end - start) * rate for start, end, rate in _step_rates(spec, duration))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, secs) if secs == secs else None  # NaN is not a delay


def backoff_delay(attempt: int, retry_after: float | None, rng: random.Random, base_s: float = 0.5,
                  cap_s: float = 30.0) -> float:
    """How long to wait before retry number `attempt` (1-based).

    The server's Retry-After is honoured as given (capped at `cap_s` so a broken header cannot
    stall a run); without one, exponential back-off with full jitter: uniform(0, min(cap, base*2^(n-1))).
    """
    if retry_after is not None:
        return min(retry_after, cap_s)
    return rng.uniform(0.0, min(cap_s, base_s * 2 ** max(0, attempt - 1)))
