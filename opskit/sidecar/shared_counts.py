"""Call series that proxy worker processes count into and the exporter reads: one shared segment each.

With `--proxy-workers N` each worker process counts its calls into its own segment of shared memory
(a memfd the exporter creates and keeps, handed to the worker as a file descriptor); only that worker
writes it, only the exporter reads it, at scrape time, and merges every worker's segment into its
registry: counters summed, histograms summed bucket by bucket, in-flight summed, a "last value" gauge
(rate-limit headroom) taken from the worker that set it most recently.

Why shared memory rather than messages: the worker's hot path stays a few float additions (no
serialisation, no syscall per call, no work for the exporter per call), and a worker that dies takes
nothing with it: its counts are in the segment, which outlives it. Its replacement attaches the same
segment and goes on counting from there, so nothing is counted twice either.

What a worker's death can lose, exactly: the calls it had in flight. They never finish, so they are
never counted in `opskit_llm_requests_total` (their clients see the connection drop); their share of
`opskit_llm_in_flight` is set back to 0 before the replacement starts. A worker killed in the middle of
accounting one call (between the first and the last of its series updates, a few microseconds) may
leave that call in some series and not in others.

Layout of a segment (native byte order; one writer, so no locks): a header of 8 uint64 (magic, number
of entries, pid of the worker once it serves, number of starts), an append-only index of entries
(key offset, key length, value offset, kind << 32 | value count), the keys (JSON `[name, *label
values]`), and float64 values. An entry is written before the count that publishes it, and its values
are only touched after that, so a reader never sees a half-made entry (one it cannot read yet, on
a CPU that reorders stores, it reads at the next scrape). Each value is one aligned 8-byte
store. Capacity: MAX_ENTRIES label sets per worker (the catalogue's labels are bounded far below that);
a label set beyond it is not counted and is logged once.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import mmap
import os
import tempfile
import threading
import time

from opskit.core import catalog
from opskit.core.catalog import Metric

log = logging.getLogger("opskit.sidecar.shared_counts")

MAGIC = 0x6F70736B69740001
HEADER_WORDS = 8
ENTRY_WORDS = 4
MAX_ENTRIES = 16384
KEY_BYTES = 2 * 1024 * 1024
MAX_VALUES = 256 * 1024
_INDEX = HEADER_WORDS * 8
_KEYS = _INDEX + MAX_ENTRIES * ENTRY_WORDS * 8
_VALUES = _KEYS + KEY_BYTES
SIZE = _VALUES + MAX_VALUES * 8

ADD, HIST, LIVE, LAST = range(4)  # counter, histogram (buckets then sum), summed gauge, most recent gauge
LIVE_GAUGES = frozenset({catalog.LLM_IN_FLIGHT.name})  # gauges that count what a worker holds now
_N_ENTRIES, _PID, _STARTS = 1, 2, 3


def series_name(metric: Metric) -> str:
    """The name prometheus_client gives the metric object (a counter's without `_total`)."""
    return metric.name.removesuffix("_total") if metric.type == catalog.COUNTER else metric.name


class Segment:
    """One worker's shared segment: `create()` in the exporter, `attach(fd)` in the worker."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mm = mmap.mmap(fd, SIZE)
        view = memoryview(self.mm)
        self.head = view[:_INDEX].cast("Q")
        self.index = view[_INDEX:_KEYS].cast("Q")
        self.keys = view[_KEYS:_VALUES]
        self.values = view[_VALUES:SIZE].cast("d")

    @classmethod
    def create(cls, name: str = "opskit-worker") -> Segment:
        """A new, zeroed segment (pages are only allocated when first written)."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create(name, 0)  # no name in any file system, gone with the last holder
        else:
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        os.ftruncate(fd, SIZE)
        seg = cls(fd)
        seg.head[0] = MAGIC
        return seg

    @property
    def count(self) -> int:
        """Entries published so far."""
        return self.head[_N_ENTRIES]

    @property
    def pid(self) -> int:
        """The pid of the worker serving from this segment (0 until it serves)."""
        return self.head[_PID]

    def entry(self, i: int) -> tuple[tuple[str, ...], int, int, int]:
        """(key, kind, value offset, value count) of entry i."""
        ko, kl, vo, kn = self.index[i * ENTRY_WORDS:(i + 1) * ENTRY_WORDS]
        if not kl or ko + kl > KEY_BYTES or vo + (kn & 0xFFFFFFFF) > MAX_VALUES:
            raise ValueError("entry not written yet")
        return tuple(json.loads(bytes(self.keys[ko:ko + kl]))), kn >> 32, vo, kn & 0xFFFFFFFF

    def before_start(self) -> None:
        """Called by the exporter before a worker (re)starts on this segment: what a dead worker held
        in flight is no longer in flight, and the new worker is not serving yet."""
        for i in range(self.count):
            _, kind, off, _ = self.entry(i)
            if kind == LIVE:
                self.values[off] = 0.0
        self.head[_PID] = 0
        self.head[_STARTS] += 1

    def close(self) -> None:
        for view in (self.head, self.index, self.keys, self.values):
            view.release()
        self.mm.close()
        os.close(self.fd)


class Store:
    """The worker's side: a stand-in for a CollectorRegistry that call_metrics.make() recognises."""

    def __init__(self, segment: Segment) -> None:
        self.seg = segment
        self._slots: dict[tuple[str, ...], int] = {}
        self._next_key = self._next_value = 0
        self._full_logged = False
        for i in range(segment.count):  # a replacement worker: go on from what its predecessor made
            key, _, off, n = segment.entry(i)
            self._slots[key] = off
            ko, kl = segment.index[i * ENTRY_WORDS:i * ENTRY_WORDS + 2]
            self._next_key, self._next_value = ko + kl, off + n

    def serving(self) -> None:
        """Say that this worker accepts calls now (the exporter waits for it)."""
        self.seg.head[_PID] = os.getpid()

    def make(self, metric: Metric, labelnames: tuple[str, ...]) -> _Family:
        """A metric family whose `labels(...)` children count into the segment; for a metric without
        labels its one child, made now (a writer thread may count into it later, never allocate)."""
        family = self._family(metric)
        return family if labelnames else family.labels()

    def _family(self, metric: Metric) -> _Family:
        if metric.type == catalog.COUNTER:
            return _Family(self, series_name(metric), ADD, 1, _Add)
        if metric.type == catalog.HISTOGRAM:
            bounds = [float(b) for b in metric.buckets]
            if bounds[-1] != math.inf:
                bounds.append(math.inf)
            return _Family(self, metric.name, HIST, len(bounds) + 1, lambda v, off: _Hist(v, off, bounds))
        if metric.name in LIVE_GAUGES:
            return _Family(self, metric.name, LIVE, 1, _Add)
        return _Family(self, metric.name, LAST, 2, _Last)

    def slot(self, key: tuple[str, ...], kind: int, n: int) -> int | None:
        """The value offset of a label set, made on first use; None when the segment is full."""
        off = self._slots.get(key)
        if off is not None:
            return off
        seg, raw = self.seg, json.dumps(key).encode()
        i = seg.count
        if i >= MAX_ENTRIES or self._next_key + len(raw) > KEY_BYTES or self._next_value + n > MAX_VALUES:
            if not self._full_logged:
                self._full_logged = True
                log.error("shared call counts are full (%d label sets): new label sets are not counted", i)
            return None
        ko, off = self._next_key, self._next_value
        seg.keys[ko:ko + len(raw)] = raw
        seg.index[i * ENTRY_WORDS] = ko
        seg.index[i * ENTRY_WORDS + 1] = len(raw)
        seg.index[i * ENTRY_WORDS + 2] = off
        seg.index[i * ENTRY_WORDS + 3] = kind << 32 | n
        seg.head[_N_ENTRIES] = i + 1  # published: only now may values be written
        self._next_key, self._next_value = ko + len(raw), off + n
        self._slots[key] = off
        return off


class _Family:
    __slots__ = ("store", "name", "kind", "n", "child", "children")

    def __init__(self, store: Store, name: str, kind: int, n: int, child) -> None:
        self.store, self.name, self.kind, self.n, self.child = store, name, kind, n, child
        self.children: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        """The child of one label set (as prometheus_client's `labels`)."""
        child = self.children.get(values)
        if child is None:
            off = self.store.slot((self.name, *values), self.kind, self.n)
            child = self.children[values] = _Dropped() if off is None else self.child(self.store.seg.values, off)
        return child


class _Add:
    """A counter, or a gauge summed over workers (in flight)."""

    __slots__ = ("v", "off")

    def __init__(self, values, off: int) -> None:
        self.v, self.off = values, off

    def inc(self, amount: float = 1.0, exemplar=None) -> None:
        self.v[self.off] += amount

    def dec(self, amount: float = 1.0) -> None:
        self.v[self.off] -= amount


class _Last:
    """A gauge whose merged value is the one set most recently by any worker."""

    __slots__ = ("v", "off")

    def __init__(self, values, off: int) -> None:
        self.v, self.off = values, off

    def set(self, value: float) -> None:
        self.v[self.off] = value
        self.v[self.off + 1] = time.time()


class _Hist:
    __slots__ = ("v", "off", "bounds", "sum_at")

    def __init__(self, values, off: int, bounds: list[float]) -> None:
        self.v, self.off, self.bounds, self.sum_at = values, off, bounds, off + len(bounds)

    def observe(self, amount: float, exemplar=None) -> None:
        """Count one observation: its bucket (the first bound >= it) and the sum."""
        if amount == amount:  # NaN falls in no bucket, as in prometheus_client
            self.v[self.off + bisect.bisect_left(self.bounds, amount)] += 1.0
        self.v[self.sum_at] += amount


class _Dropped:
    """The child of a label set the full segment has no room for."""

    def inc(self, amount: float = 1.0, exemplar=None) -> None: pass
    def dec(self, amount: float = 1.0) -> None: pass
    def set(self, value: float) -> None: pass
    def observe(self, amount: float, exemplar=None) -> None: pass


class Merger:
    """The exporter's side: sums every worker's segment into the metric objects of its own registry."""

    def __init__(self, segments: list[Segment], metrics: dict[str, object]) -> None:
        self.segments = segments
        self.metrics = metrics  # prometheus_client metric objects by `_name`
        self._entries: list[list[tuple[tuple[str, ...], int, int, int]]] = [[] for _ in segments]
        self._children: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()  # scrapes merge on a worker thread, the drain reads totals on the loop

    def _read(self) -> dict[tuple[str, ...], tuple[int, list[float]]]:
        with self._lock:
            return self._read_locked()

    def _read_locked(self) -> dict[tuple[str, ...], tuple[int, list[float]]]:
        merged: dict[tuple[str, ...], tuple[int, list[float]]] = {}
        for seg, known in zip(self.segments, self._entries, strict=True):
            for i in range(len(known), seg.count):  # append-only: parse each entry once
                try:
                    entry = seg.entry(i)
                except (ValueError, TypeError):  # not all visible yet (a CPU that reorders stores): next scrape
                    break
                known.append(entry)
            values = seg.values
            for key, kind, off, n in known:
                vals = values[off:off + n].tolist()
                have = merged.get(key)
                if have is None:
                    merged[key] = (kind, vals)
                elif kind == LAST:
                    if vals[1] > have[1][1]:
                        merged[key] = (kind, vals)
                else:
                    merged[key] = (kind, [a + b for a, b in zip(have[1], vals, strict=True)])
        return merged

    def total(self, name: str) -> float:
        """The sum over workers and label sets of one counter (by series_name)."""
        return sum(vals[0] for key, (_, vals) in self._read().items() if key[0] == name)

    def merge(self, count: str = "") -> float:
        """Set every worker-counted series in the registry to its merged value; returns the merged sum of
        the counter named `count` (by series_name), read in the same pass."""
        with self._lock:
            return self._merge_locked(count)

    def _merge_locked(self, count: str) -> float:
        total = 0.0
        for key, (kind, vals) in self._read_locked().items():
            if key[0] == count:
                total += vals[0]
            child = self._children.get(key)
            if child is None:
                metric = self.metrics.get(key[0])
                if metric is None:
                    continue
                child = self._children[key] = metric.labels(*key[1:]) if len(key) > 1 else metric
            if kind == HIST:
                for bucket, v in zip(child._buckets, vals, strict=False):
                    bucket.set(v)
                child._sum.set(vals[-1])
            elif kind == LAST:
                if vals[1] > 0:
                    child._value.set(vals[0])
            else:
                child._value.set(vals[0])
        return total
