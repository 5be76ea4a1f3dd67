"""Prometheus series for LLM calls, built from the catalogue into a registry that is passed in.

Every source (metering proxy, active probe) reports through one `CallMetrics`: `started()` when a
call begins and `finished(record)` when it ends, so counts, histograms, in-flight and rate-limit
gauges are all derived from the same `CallRecord`.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.samples import Exemplar

from opskit.core import catalog
from opskit.core.catalog import Metric
from opskit.core.llm_json import MAX_ID_CHARS
from opskit.core.pricing import Prices
from opskit.core.records import OK, CallRecord


def make(metric: Metric, registry: CollectorRegistry, labels: Iterable[str] | None = None):
    """A prometheus_client metric for a catalogue entry, registered in `registry`; or, in a proxy
    worker process, a metric counting into shared memory (`registry` is a shared_counts.Store)."""
    labelnames = tuple(metric.labels if labels is None else labels)
    if not isinstance(registry, CollectorRegistry):
        return registry.make(metric, labelnames)
    kw = {"registry": registry, "labelnames": labelnames}
    if metric.type == catalog.COUNTER:
        return Counter(metric.name, metric.help, **kw)
    if metric.type == catalog.HISTOGRAM:
        return Histogram(metric.name, metric.help, buckets=metric.buckets, **kw)
    return Gauge(metric.name, metric.help, **kw)


class CallMetrics:
    """Call series for a set of targets; `models` maps target name -> the models it may label."""

    def __init__(self, registry: CollectorRegistry, models: Mapping[str, Iterable[str]],
                 prices: Mapping[str, Prices] | None = None, clock: Callable[[], float] = time.time) -> None:
        self._models = {t: frozenset(ms) for t, ms in models.items()}
        self._prices = dict(prices or {})  # target -> its prices; no spend for a target without
        self._clock = clock                # wall clock (UTC), for off-peak windows
        # exemplars live in prometheus_client's buckets; a proxy worker's shared-memory counts keep none
        self._exemplars = isinstance(registry, CollectorRegistry)
        self.requests = make(catalog.LLM_REQUESTS, registry)
        self.duration = make(catalog.LLM_DURATION, registry)
        self.ttft = make(catalog.LLM_TTFT, registry)
        self.tpot = make(catalog.LLM_TPOT, registry)
        self.tokens = make(catalog.LLM_TOKENS, registry)
        self.spend = make(catalog.LLM_SPEND, registry)
        self.in_flight = make(catalog.LLM_IN_FLIGHT, registry)
        self.rl_requests = make(catalog.LLM_RL_REQUESTS, registry)
        self.rl_tokens = make(catalog.LLM_RL_TOKENS, registry)
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._in_flight: dict[tuple[str, str], Callable[[float], None]] = {}

    def model_label(self, target: str, model: str | None) -> str:
        """`model` capped to the target's configured models, else `other`."""
        return catalog.cap_model(model, self._models.get(target, frozenset()))

    def started(self, target: str, source: str) -> None:
        self._flight(target, source)(1)

    def finished(self, record: CallRecord) -> None:
        """Account a finished call that was announced with started()."""
        self._flight(record.target, record.source)(-1)
        self.observe(record)

    def _flight(self, target: str, source: str):
        """The in-flight gauge's adder, looked up once (`labels()` hashes and locks on every call)."""
        add = self._in_flight.get((target, source))
        if add is None:
            add = self._in_flight[(target, source)] = self.adder(self.in_flight.labels(target, source))
        return add

    def adder(self, child):
        """`add(amount)` for a counter or gauge child, as cheap as it gets: prometheus_client's value
        itself (the child's own `inc` re-checks, on every call, what cannot change: three frames of
        ~five), or a shared-memory child's `inc`."""
        return child._value.inc if self._exemplars else child.inc

    def observe(self, r: CallRecord) -> None:
        """Account a finished call."""
        model = self.model_label(r.target, r.model)
        base = (r.target, r.source, model)
        series = self._series.get(base)
        if series is None:
            series = self._series[base] = _Series(self, base)
        # Latency of successful calls only (a fast 429 is no fast answer); TTFT/TPOT of streamed ones.
        # The call's request id is the bucket's exemplar (OpenMetrics): a slow bucket leads to its calls.
        if r.error_type == OK:
            observe = _observe if self._exemplars else _observe_shared
            ex = None
            if r.request_id and self._exemplars:
                ex = ({"request_id": r.request_id[:MAX_ID_CHARS]}, time.time())
            observe(series.duration_of(r.streamed), r.duration_s, ex)
            if r.streamed and r.ttft_s is not None:
                observe(series.ttft, r.ttft_s, ex)
                tpot = r.tpot_s
                if tpot is not None:
                    observe(series.tpot, tpot, ex)
        if r.input_tokens:
            series.tokens_in(r.input_tokens)
        if r.output_tokens:
            series.tokens_out(r.output_tokens)
        if r.cached_input_tokens:
            series.part("cached_input")(r.cached_input_tokens)
        if r.reasoning_tokens:
            series.part("reasoning")(r.reasoning_tokens)
        prices = self._prices.get(r.target)
        if prices is not None and (r.input_tokens or r.output_tokens):
            cost = prices.cost(r.model, r.input_tokens, r.cached_input_tokens, r.output_tokens, self._clock())
            if cost:
                self.spend.labels(*base, prices.currency).inc(cost)
        if r.ratelimit_remaining_requests is not None:
            self.rl_requests.labels(r.target, r.source).set(r.ratelimit_remaining_requests)
        if r.ratelimit_remaining_tokens is not None:
            self.rl_tokens.labels(r.target, r.source).set(r.ratelimit_remaining_tokens)
        # Counted last: a reader that sees the call counted (a scrape, a test in another thread) finds
        # the rest of it in place too, and the spend was priced at the clock of its own call.
        key = (r.code, r.error_type)
        count = series.requests.get(key)
        if count is None:
            count = series.requests[key] = self.adder(self.requests.labels(*base, str(r.code), r.error_type))
        count(1)


def _observe(child, value: float, ex: tuple[dict[str, str], float] | None) -> None:
    """prometheus_client's Histogram.observe(value, exemplar), less what it does per call that the proxy
    does not need: a Python loop over the buckets (a bisect here), the observability check and the
    exemplar's label validation (the one label is fixed and its value cut to fit)."""
    child._sum.inc(value)
    bounds = child._upper_bounds
    i = bisect.bisect_left(bounds, value)
    if i < len(bounds) and value <= bounds[i]:  # (NaN lands in no bucket, as with observe())
        bucket = child._buckets[i]
        bucket.inc(1)
        if ex is not None:
            bucket.set_exemplar(Exemplar(ex[0], value, ex[1]))


def _observe_shared(child, value: float, ex) -> None:
    child.observe(value)  # a proxy worker's shared-memory histogram (no exemplars)


class _Series:
    """The labelled children of one (target, source, model), looked up once: `labels()` hashes and
    locks on every call, and the proxy accounts every request through here. Counters are held as
    adders (CallMetrics.adder), histograms as children."""

    __slots__ = ("m", "base", "requests", "durations", "ttft", "tpot", "tokens_in", "tokens_out", "parts")

    def __init__(self, m: CallMetrics, base: tuple[str, str, str]) -> None:
        self.requests: dict[tuple[int, str], Callable[[float], None]] = {}
        self.m, self.base = m, base
        self.durations: dict[bool, object] = {}  # by streamed; made when first seen (a proxy may see one kind)
        self.ttft = m.ttft.labels(*base)
        self.tpot = m.tpot.labels(*base)
        self.tokens_in = m.adder(m.tokens.labels(*base, "input"))
        self.tokens_out = m.adder(m.tokens.labels(*base, "output"))
        self.parts: dict[str, Callable[[float], None]] = {}  # cached_input, reasoning: when a usage first states them

    def duration_of(self, streamed: bool):
        """The duration histogram child of streamed (stream="true") or non-streamed calls."""
        child = self.durations.get(streamed)
        if child is None:
            child = self.durations[streamed] = self.m.duration.labels(*self.base, "true" if streamed else "false")
        return child

    def part(self, token_type: str) -> Callable[[float], None]:
        """The token counter's adder for a part of input or output (cached_input, reasoning)."""
        add = self.parts.get(token_type)
        if add is None:
            add = self.parts[token_type] = self.m.adder(self.m.tokens.labels(*self.base, token_type))
        return add
