"""Default CPU placement of a load test's processes: the helpers (embedded mock, metering exporter) on
one core, Locust on the others, when this process may use two or more.

Why: a stream's chunk and the client reading it wake two processes at the same moment. On one shared
core the one that runs second is late by the other's work, and a burst of chunks (many streams due
at once) makes every stream in it late by the whole burst: that lateness lands in the measured TTFT
and ITL, but not in the mock's ground truth. On separate cores each side only waits for itself.

Placement uses `os.sched_setaffinity` on the child right after it starts (before it runs any thread
of its own; threads inherit their creator's set). It is skipped with fewer than two usable cores,
where the OS cannot set affinity, and when nothing but Locust runs (a real target without proxy);
Locust is left unconfined when it runs more processes than the cores left to it (runner.open_target).
A helper that forks workers of its own (the exporter's proxy workers) hands them its one core.

Each placed process also asks for a short scheduler slice (`short_slice`): on a machine shared with
other busy processes, a woken mock or Locust otherwise waited out a neighbour's whole slice (~1.4 ms,
often several in a row) before it could send a due token or read one, and that wait landed in TTFT.
Since Linux 6.12 a SCHED_OTHER task may request its own slice (`sched_attr.sched_runtime`, no
privilege needed); a shorter one lets it run sooner when it wakes, for shorter turns: the same share
of the CPU, earlier. Older kernels ignore the request.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import dataclass

SLICE_NS = 100_000  # the kernel's lower bound for a requested slice
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(platform.machine())  # syscall numbers
_SCHED_ATTR = struct.Struct("IIQiIQQQII")  # struct sched_attr, version 1 (56 bytes)


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
    """Confine process `pid` to `cpus` and give it a short slice; False (and no change) when `cpus` is
    empty or confining is not possible."""
    if not cpus:
        return False
    short_slice(pid)
    try:
        os.sched_setaffinity(pid, cpus)
    except (AttributeError, OSError):  # gone already, not permitted, or not Linux
        return False
    return True


def short_slice(pid: int, slice_ns: int = SLICE_NS) -> bool:
    """Ask for a `slice_ns` scheduler slice for `pid` (policy and nice unchanged: SCHED_OTHER at its
    nice value); False where the platform has no sched_setattr or refuses it."""
    if _SCHED_SETATTR is None:
        return False
    try:
        nice = os.getpriority(os.PRIO_PROCESS, pid)
        attr = ctypes.create_string_buffer(_SCHED_ATTR.pack(_SCHED_ATTR.size, 0, 0, nice, 0, slice_ns, 0, 0, 0, 0),
                                           _SCHED_ATTR.size)
        return ctypes.CDLL(None, use_errno=True).syscall(_SCHED_SETATTR, pid, attr, 0) == 0
    except (OSError, AttributeError):
        return False
