"""Default CPU placement of a load test's processes: the helpers (embedded mock, metering exporter) on
one core, Locust on the others, when this process may use two or more.

Why: a stream's chunk and the client reading it wake two processes at the same moment. On one shared
core the one that runs second is late by the other's work, and a burst of chunks (many streams due
at once) makes every stream in it late by the whole burst: that lateness lands in the measured TTFT
and ITL, but not in the mock's ground truth. On separate cores each side only waits for itself.

Placement uses `os.sched_setaffinity` on the child right after it starts (before it runs any thread
of its own; threads inherit their creator's set). It is skipped with fewer than two usable cores,
where the OS cannot set affinity, and when nothing but Locust runs (a real target without proxy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """CPU sets for the helpers and for Locust's processes (disjoint)."""

    helpers: frozenset[int]
    load: frozenset[int]


def plan(cpus: set[int] | None = None) -> Placement | None:
    """Helpers on the highest-numbered usable core, Locust on the rest; None with fewer than two."""
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # not Linux: leave placement to the OS
            return None
    cores = sorted(cpus)
    if len(cores) < 2:
        return None
    return Placement(helpers=frozenset(cores[-1:]), load=frozenset(cores[:-1]))


def pin(pid: int, cpus: frozenset[int] | None) -> bool:
    """Confine process `pid` to `cpus`; False (and no change) when that is not possible."""
    if not cpus:
        return False
    try:
        os.sched_setaffinity(pid, cpus)
    except (AttributeError, OSError):  # gone already, not permitted, or not Linux
        return False
    return True


def describe(p: Placement | None) -> str:
    """`mock/exporter on CPU 1, Locust on CPU 0` (or why there is no placement), for the run's notes."""
    if p is None:
        return "no CPU placement (fewer than two usable cores)"
    fmt = lambda s: ",".join(str(c) for c in sorted(s))  # noqa: E731
    return f"helpers on CPU {fmt(p.helpers)}, Locust on CPU {fmt(p.load)}"
