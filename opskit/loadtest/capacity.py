"""Capacity search: the highest load at which every SLO of a scenario still holds. Pure computation
here (the search, attainment with Wilson intervals, the knee, the summary); running a level is
`capacity_run.py`, the report `capacity_report.py`.

The search ramps the load geometrically (x `factor`) until a level misses an SLO or the target
saturates, then bisects between the last good and the first bad level until they are within
`resolution` of each other or the time budget is spent. "Max load at SLO" is the last good level;
its interval is [last good, first bad): the true limit lies in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

# Requests a level needs so that a p95 rests on >= 10 requests above it, and so that the Wilson
# interval of an attainment near 95 % is about +-3 points wide.
MIN_REQUESTS = 200


@dataclass
class Level:
    """One measured load level."""

    load: float                      # offered: requests/s (by rate) or concurrent users (by users)
    duration: float
    requests: int
    passed: bool
    missed: list[str] = field(default_factory=list)   # names of the checks that failed
    saturated: bool = False          # achieved < 95 % of offered, or TTFT still growing at the end
    achieved_rps: float = 0.0
    goodput_rps: float = 0.0         # requests that met every objective, per second
    goodput_tokens_s: float = 0.0
    error_ratio: float = 0.0
    ttft_s: dict = field(default_factory=dict)      # p50/p95/p99
    duration_s: dict = field(default_factory=dict)
    attainment: dict = field(default_factory=dict)  # objective -> {"ratio", "low", "high", "n"}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a proportion k/n; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def attainment(df: pd.DataFrame, objectives: dict[str, float | None]) -> dict[str, dict]:
    """Per objective, the share of requests that met it, with its Wilson interval: TTFT and duration
    within their limits (an error misses both), no error."""
    out: dict[str, dict] = {}
    n = len(df)
    if not n:
        return out
    ok = df["ok"].astype(bool)
    met = {"error_free": ok}
    if objectives.get("ttft_p95_seconds") is not None and df["ttft_s"].notna().any():
        met["ttft_within"] = ok & (df["ttft_s"] <= objectives["ttft_p95_seconds"])
    if objectives.get("duration_p90_seconds") is not None:
        met["duration_within"] = ok & (df["duration_s"] <= objectives["duration_p90_seconds"])
    for name, mask in met.items():
        k = int(mask.sum())
        low, high = wilson(k, n)
        out[name] = {"ratio": k / n, "low": low, "high": high, "n": n}
    return out


def good_mask(df: pd.DataFrame, objectives: dict[str, float | None]) -> pd.Series:
    """Requests that met every per-request objective (goodput counts these)."""
    mask = df["ok"].astype(bool)
    if objectives.get("ttft_p95_seconds") is not None:
        mask &= df["ttft_s"].isna() | (df["ttft_s"] <= objectives["ttft_p95_seconds"])
    if objectives.get("duration_p90_seconds") is not None:
        mask &= df["duration_s"] <= objectives["duration_p90_seconds"]
    return mask


def still_growing(df: pd.DataFrame) -> bool:
    """A queue building up: the last third's median TTFT (else duration) over twice the first third's."""
    ok = df[df["ok"].astype(bool)].sort_values("t_sched")
    col = "ttft_s" if ok["ttft_s"].notna().sum() >= 30 else "duration_s"
    s = ok[col].dropna()
    if len(s) < 30:
        return False
    third = len(s) // 3
    first, last = float(s.iloc[:third].median()), float(s.iloc[-third:].median())
    return last > 2 * first and last - first > 0.05


def level_duration(load: float, by: str, min_s: float, per_request_s: float = 1.0) -> float:
    """Seconds a level runs so that it holds MIN_REQUESTS: at `load` req/s, or for `load` users each
    making one call per `per_request_s`."""
    rate = load if by == "rate" else load / max(per_request_s, 1e-3)
    return max(min_s, MIN_REQUESTS / max(rate, 1e-6))


@dataclass
class SearchPlan:
    """How the search moves: start, geometric factor, stopping resolution, bounds and budget."""

    start: float = 4.0
    factor: float = 2.0
    resolution: float = 0.1          # stop when (bad - good) / good <= this
    max_load: float = 5000.0
    min_load: float = 0.5
    budget_s: float = 600.0


def next_load(levels: list[Level], plan: SearchPlan) -> float | None:
    """The next load to try given the levels so far, or None when the search is done."""
    if not levels:
        return plan.start
    good = [lv.load for lv in levels if lv.passed]
    bad = [lv.load for lv in levels if not lv.passed]
    if not bad:  # ramping up
        nxt = max(good) * plan.factor
        return nxt if nxt <= plan.max_load else None
    lo, hi = (max((g for g in good if g < min(bad)), default=0.0)), min(bad)
    if lo == 0.0:  # even the first level failed: ramp down
        nxt = hi / plan.factor
        return nxt if nxt >= plan.min_load else None
    if (hi - lo) / lo <= plan.resolution:
        return None
    return math.sqrt(lo * hi)  # bisect on a log scale: loads span orders of magnitude


def search(measure: Callable[[float], Level], plan: SearchPlan, clock: Callable[[], float],
           estimate_s: Callable[[float], float] | None = None) -> list[Level]:
    """Measure levels chosen by `next_load` until it says stop or the budget would be overrun
    (`estimate_s(load)`: how long a level at that load will take)."""
    levels: list[Level] = []
    started = clock()
    while (load := next_load(levels, plan)) is not None:
        need = estimate_s(load) if estimate_s else 0.0
        if levels and clock() - started + need > plan.budget_s:
            break
        levels.append(measure(load))
    return levels


def knee(levels: list[Level]) -> dict | None:
    """Where latency starts to climb against throughput: the Kneedle point of (achieved req/s, p95
    duration) over the levels, by increasing load; None with fewer than 3 levels."""
    pts = sorted((lv.achieved_rps, lv.duration_s.get("p95"), lv.load) for lv in levels
                 if lv.duration_s.get("p95") is not None)
    if len(pts) < 3:
        return None
    x = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    xn, yn = (x - x.min()) / np.ptp(x), (y - y.min()) / np.ptp(y)
    i = int(np.argmax(xn - yn))
    return {"load": pts[i][2], "achieved_rps": float(x[i]), "duration_p95_s": float(y[i])}


def summarize(levels: list[Level], by: str, scenario: str) -> dict:
    """The answer: max load at SLO with its interval, the SLO that limits, goodput, knee, a sentence."""
    good = sorted((lv for lv in levels if lv.passed), key=lambda lv: lv.load)
    bad = sorted((lv for lv in levels if not lv.passed), key=lambda lv: lv.load)
    best = good[-1] if good else None
    first_bad = next((lv for lv in bad if best is None or lv.load > best.load), None)
    unit = "req/s" if by == "rate" else "users"
    limiting = first_bad.missed[0] if first_bad and first_bad.missed else None
    if best is None:
        sentence = f"misses an SLO even at {min(lv.load for lv in levels):g} {unit}" if levels else "no level ran"
    elif first_bad is None:
        sentence = f"meets every SLO up to {best.load:g} {unit}, the highest load tried"
    else:
        sentence = (f"meets every SLO up to {best.load:g} {unit} (limit between {best.load:g} and "
                    f"{first_bad.load:g}); {limiting or 'saturation'} breaks first")
    return {"kind": "capacity", "scenario": scenario, "by": by, "unit": unit,
            "max_load": best.load if best else None,
            "interval": [best.load if best else 0.0, first_bad.load if first_bad else None],
            "limiting_slo": limiting, "goodput_rps": best.goodput_rps if best else None,
            "goodput_tokens_s": best.goodput_tokens_s if best else None, "knee": knee(levels),
            "sentence": sentence, "levels": [asdict(lv) for lv in sorted(levels, key=lambda lv: lv.load)]}


def headroom_check(summary: dict, planned: float, min_headroom: float) -> tuple[bool, str]:
    """Whether the max load at SLO is at least `min_headroom` x the planned load, and a line saying so."""
    best = summary.get("max_load") or 0.0
    need = planned * min_headroom
    ok = best >= need
    return ok, (f"headroom {'OK' if ok else 'TOO LOW'}: max load at SLO {best:g} {summary['unit']} "
                f"{'>=' if ok else '<'} {min_headroom:g} x planned {planned:g} = {need:g}")
