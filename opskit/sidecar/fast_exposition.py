"""Text exposition (format 0.0.4, or OpenMetrics 1.0 with exemplars) of a registry: the bytes of
prometheus_client's `generate_latest` (or its OpenMetrics one), for less CPU.

Why: prometheus_client builds a dict and a namedtuple per sample and re-escapes and re-sorts every
label on every scrape (~7-10 µs per sample here). The call histograms of 10 targets are ~5,000
samples, so a scrape cost 35-70 ms against a 10 ms budget. `Renderer` keeps, per label set, the
rendered `name{labels} ` prefix of each sample and per scrape only reads values and joins strings.

It reads prometheus_client's metric objects directly (Counter, Gauge, Histogram with labels; the
version is pinned in pyproject.toml) and hands every other collector (custom collectors such as the
GPU one, metrics without labels) to `generate_latest` itself. tests/test_exporter.py checks that its
output is byte-for-byte that of `generate_latest`, so a change in the library's internals shows up
there first.

OpenMetrics (`render(openmetrics=True)`, what Prometheus asks for first) differs in three places:
counter families are named without `_total` in HELP/TYPE, HELP also escapes `"`, and a histogram
bucket carries its exemplar (` # {request_id="..."} value timestamp`); the page ends in `# EOF`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import metrics as _pc_metrics
from prometheus_client import values as _pc_values
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest
from prometheus_client.utils import floatToGoString

_FAST_TYPES = (Counter, Gauge, Histogram)
_MAX_CACHED = 200_000  # label sets; a bound in case a caller ever labels with unbounded values


def fmt(value: float) -> str:
    """floatToGoString, with a shortcut for the common case where it equals repr()."""
    if -math.inf < value < 1e6:  # false for NaN and +-Inf; below 1e6 Go and Python agree
        return repr(float(value))
    return floatToGoString(value)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    """`{a="x",b="y"}` with names sorted, as generate_latest writes them."""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs))
    return "{" + body + "}" if body else ""


class _One:
    """A registry of one collector, for generate_latest."""

    def __init__(self, collector) -> None:
        self._collector = collector

    def collect(self):
        return self._collector.collect()


class Renderer:
    """Renders `registry` as the Prometheus text format; one per registry, reused across scrapes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._prefixes: dict[tuple[object, tuple[str, ...]], tuple[str, ...]] = {}
        # id(bucket) -> (its exemplar, rendered): a bucket's exemplar changes only when a call lands
        # in it, so most scrapes reuse the text (holding the exemplar keeps the identity check sound)
        self._exemplars: dict[int, tuple[object, str]] = {}

    def render(self, openmetrics: bool = False) -> bytes:
        """The exposition: equal to `generate_latest(registry)`, or with `openmetrics` to
        prometheus_client.openmetrics.exposition.generate_latest(registry)."""
        reg = self._registry
        if reg._target_info or _pc_metrics._use_created or _pc_values.ValueClass is not _pc_values.MutexValue:
            # features the fast path does not reproduce
            return om_generate_latest(reg) if openmetrics else generate_latest(reg)
        with reg._lock:
            collectors = list(reg._collector_to_names)
        if len(self._prefixes) > _MAX_CACHED or len(self._exemplars) > _MAX_CACHED:
            self._prefixes.clear()
            self._exemplars.clear()
        out: list[str] = []
        for c in collectors:
            if type(c) in _FAST_TYPES and c._labelnames and not c._labelvalues:
                self._family(c, out, openmetrics)
            elif openmetrics:
                out.append(om_generate_latest(_One(c)).decode().removesuffix("# EOF\n"))
            else:
                out.append(generate_latest(_One(c)).decode())
        if openmetrics:
            out.append("# EOF\n")
        return "".join(out).encode()

    def _family(self, metric, out: list[str], openmetrics: bool = False) -> None:
        name = metric._name + ("_total" if metric._type == "counter" and not openmetrics else "")
        doc = metric._documentation.replace("\\", r"\\").replace("\n", r"\n")
        if openmetrics:
            doc = doc.replace('"', r'\"')
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {metric._type}\n")
        with metric._lock:
            children = list(metric._metrics.items())
        hist = metric._type == "histogram"
        for labelvalues, child in children:
            key = (metric, labelvalues)
            prefixes = self._prefixes.get(key)
            if prefixes is None:
                prefixes = self._prefixes[key] = _make_prefixes(metric, labelvalues)
            if not hist:
                out.append(prefixes[0] + fmt(child._value.get()) + "\n")
                continue
            acc = 0.0
            for prefix, bucket in zip(prefixes, child._buckets, strict=False):
                acc += bucket.get()
                ex = bucket._exemplar if openmetrics else None
                if ex is None:
                    out.append(prefix + fmt(acc) + "\n")
                    continue
                cached = self._exemplars.get(id(bucket))
                if cached is None or cached[0] is not ex:
                    cached = self._exemplars[id(bucket)] = (ex, _exemplar(ex))
                out.append(prefix + fmt(acc) + cached[1])
            out.append(prefixes[-2] + fmt(acc) + "\n")
            if prefixes[-1]:
                out.append(prefixes[-1] + fmt(child._sum.get()) + "\n")


def _exemplar(ex) -> str:
    """` # {labels} value timestamp` and the line's end, as the OpenMetrics generate_latest writes it."""
    ts = "" if ex.timestamp is None else f" {ex.timestamp}"
    return f" # {_labels(ex.labels.items())} {floatToGoString(ex.value)}{ts}\n"


def _make_prefixes(metric, labelvalues: tuple[str, ...]) -> tuple[str, ...]:
    """`name{labels} ` for each sample of one child: the value alone follows."""
    pairs = list(zip(metric._labelnames, labelvalues, strict=True))
    name = metric._name
    if metric._type == "counter":
        return (f"{name}_total{_labels(pairs)} ",)
    if metric._type == "gauge":
        return (f"{name}{_labels(pairs)} ",)
    buckets = tuple(f"{name}_bucket{_labels([*pairs, ('le', floatToGoString(b))])} "
                    for b in metric._upper_bounds)
    has_sum = metric._upper_bounds[0] >= 0
    return (*buckets, f"{name}_count{_labels(pairs)} ", f"{name}_sum{_labels(pairs)} " if has_sum else "")
