"""Active probe: a tiny streamed chat completion against a target, on a fixed schedule.

Each probe POSTs `{base_url}/chat/completions` with the configured prompt, `max_tokens` and model
(default: the target's first model), `stream: true` and `stream_options.include_usage`, signed by the
target's authenticator (opskit.core.auth). It produces the same CallRecord as the metering proxy (source
"probe", timings as DESIGN.md defines them) through CallMetrics, and sets `opskit_probe_success{target}`
(1/0) and `opskit_probe_duration_seconds{target}` for the last probe. An unreachable target gives
success 0 and a counted error (code 0, error_type connection; timeout when `timeout_s` passes).

Schedule: the first probe runs at once, the k-th at start + k * interval on the loop's monotonic
clock, so the schedule never drifts by the probes' own durations and has no jitter; a probe that
overruns its slot makes the scheduler skip the missed slots instead of bursting to catch up.

Cost: at the default interval of 60 s a target gets 1,440 probe calls a day, each of about
(prompt + 8 output) tokens. The default prompt, "Reply with the single word OK.", is about 10-15 input
tokens once the chat template is applied, so a day costs ~1,440 requests and ~15k-22k input + at most
11.5k output tokens: e.g. ~2 US cents a day at $0.30 per million input and $1.10 per million output
tokens. The 1,440 requests also count against the target's rate limits and daily quota.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from time import perf_counter
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

import aiohttp
from prometheus_client import CollectorRegistry, Gauge

from opskit.core import catalog, records
from opskit.core.auth import Authenticator
from opskit.core.config import ProbeConfig, Target
from opskit.core.llm_json import completion_usage
from opskit.core.records import CallRecord
from opskit.core.sse import SSEParser
from opskit.core.stream_meter import StreamMeter
from opskit.sidecar.call_metrics import CallMetrics, make

log = logging.getLogger("opskit.sidecar.probe")

SOURCE = "probe"


def next_slot(start: float, interval: float, now: float, k: int) -> tuple[int, float]:
    """After slot `k` ran, the next slot index and its time: the first start + k' * interval with
    k' > k that is not already past (missed slots are skipped, not made up)."""
    k_next = max(k + 1, math.ceil((now - start) / interval))
    return k_next, start + k_next * interval


# A registry takes each metric name once, and several Probers (one per target) share one registry.
_GAUGES: WeakKeyDictionary[CollectorRegistry, tuple[Gauge, Gauge]] = WeakKeyDictionary()


def _probe_gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge]:
    """opskit_probe_success and opskit_probe_duration_seconds in `registry`, registered on first use."""
    if registry not in _GAUGES:
        _GAUGES[registry] = (make(catalog.PROBE_SUCCESS, registry), make(catalog.PROBE_DURATION, registry))
    return _GAUGES[registry]


def _float_header(headers, name: str) -> float | None:
    try:
        return float(headers[name])
    except (KeyError, ValueError):
        return None


class Prober:
    """Probes one target. `clock` and `sleep` are injectable so the schedule can be tested."""

    def __init__(self, target: Target, cfg: ProbeConfig, metrics: CallMetrics, registry: CollectorRegistry,
                 clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.target, self.cfg, self.metrics = target, cfg, metrics
        self.model = cfg.model or target.models[0]
        self.url = target.base_url + "/chat/completions"
        self.path = urlsplit(self.url).path
        self.body = json.dumps({
            "model": self.model, "messages": [{"role": "user", "content": cfg.prompt}],
            "max_tokens": cfg.max_tokens, "stream": True, "stream_options": {"include_usage": True},
        }).encode()
        self.success, self.duration = _probe_gauges(registry)
        self._clock, self._sleep = clock, sleep
        self._auth = None
        self._session: aiohttp.ClientSession | None = None
        self._last_ok: bool | None = None  # the previous probe's outcome, for logging changes only

    async def probe_once(self) -> CallRecord:
        """Run one probe, account it, and return its record. Never raises on target failures."""
        self.metrics.started(self.target.name, SOURCE)
        t0 = perf_counter()
        detail = None
        try:
            rec = await self._call(t0)
        except Exception as exc:  # e.g. the auth token endpoint failing: the probe failed, not the exporter
            detail = f"failed before the call: {type(exc).__name__}"
            rec = self._record(0, records.CONNECTION, t0)
        self.metrics.finished(rec)
        self.success.labels(self.target.name).set(1 if rec.ok else 0)
        self.duration.labels(self.target.name).set(rec.duration_s)
        self._log_change(rec, detail)
        return rec

    def _log_change(self, rec: CallRecord, detail: str | None = None) -> None:
        """One log line when the probe starts failing (and why) and one when it recovers, never one per
        probe: the series count every failure, and a down target must not flood the sidecar's log."""
        if rec.ok == self._last_ok:
            return
        if not rec.ok:
            status = detail or (f"HTTP {rec.code}" if rec.code else "no response")
            log.warning("probe of %s failing: %s (%s)", self.target.name, rec.error_type, status)
        elif self._last_ok is False:
            log.info("probe of %s succeeding again", self.target.name)
        self._last_ok = rec.ok

    async def run_forever(self) -> None:
        """Probe at start, start + interval, ...; returns only when cancelled (then closes its session)."""
        clock = self._clock or asyncio.get_running_loop().time
        interval = self.cfg.interval_s
        start, k = clock(), 0
        try:
            while True:
                try:
                    await self.probe_once()
                except Exception as exc:  # a bug must not end the probe loop
                    log.error("probe of %s: unexpected %s", self.target.name, type(exc).__name__)
                k, at = next_slot(start, interval, clock(), k)
                await self._sleep(max(0.0, at - clock()))
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the HTTP session (the next probe opens a new one)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _record(self, code: int, error_type: str, t0: float, **kw) -> CallRecord:
        return CallRecord(target=self.target.name, source=SOURCE,
                          model=self.metrics.model_label(self.target.name, self.model), code=code,
                          error_type=error_type, duration_s=perf_counter() - t0, **kw)

    async def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._auth is None:
            self._auth = Authenticator(self.target.auth, timeout_s=self.cfg.timeout_s)
        headers.update(await self._auth.aheaders("POST", self.path, self.body))
        return headers

    async def _call(self, t0: float) -> CallRecord:
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        code, meter = 0, None
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                headers = await self._headers()
                async with self._session.post(self.url, data=self.body, headers=headers) as resp:
                    code = resp.status
                    rl = {"ratelimit_remaining_requests": _float_header(resp.headers, "x-ratelimit-remaining-requests"),
                          "ratelimit_remaining_tokens": _float_header(resp.headers, "x-ratelimit-remaining-tokens")}
                    if code != 200:
                        await resp.read()
                        return self._record(code, records.error_type_for_status(code), t0, **rl)
                    if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                        return self._json_record(await resp.read(), t0, rl)
                    meter = StreamMeter(t0)
                    await self._read_stream(resp, meter)
                    return self._stream_record(meter, t0, rl)
        except TimeoutError:
            return self._partial(code, records.TIMEOUT, t0, meter)
        except (aiohttp.ClientError, OSError):
            return self._partial(code, records.CONNECTION if code == 0 else records.STREAM_BROKEN, t0, meter)

    @staticmethod
    async def _read_stream(resp: aiohttp.ClientResponse, meter: StreamMeter) -> None:
        parser = SSEParser()
        async for chunk in resp.content.iter_any():
            now = perf_counter()
            for payload in parser.feed(chunk):
                meter.on_data(payload, now)
        for payload in parser.close():
            meter.on_data(payload, perf_counter())

    def _stream_record(self, m: StreamMeter, t0: float, rl: dict) -> CallRecord:
        error_type = records.OK
        if m.malformed or not m.done:
            error_type = records.STREAM_BROKEN
        elif m.stream_error:
            error_type = records.SERVER_ERROR
        inp, out, from_usage = m.tokens
        cached, reasoning = m.details
        return self._record(200, error_type, t0, ttft_s=m.ttft, ttfot_s=m.ttfot, input_tokens=inp,
                            output_tokens=out, tokens_from_usage=from_usage, streamed=True,
                            text_chunks=m.text_chunks, cached_input_tokens=cached, reasoning_tokens=reasoning,
                            **rl)

    def _json_record(self, body: bytes, t0: float, rl: dict) -> CallRecord:
        """The target ignored `stream: true` and answered with one JSON body."""
        u = completion_usage(body)
        rec = self._record(200, records.OK, t0, input_tokens=u.input, output_tokens=u.output,
                           tokens_from_usage=u.from_usage, cached_input_tokens=u.cached,
                           reasoning_tokens=u.reasoning, **rl)
        rec.text_chunks = int(u.has_text)  # not streamed: a duration, no TTFT (DESIGN.md)
        return rec

    def _partial(self, code: int, error_type: str, t0: float, meter: StreamMeter | None) -> CallRecord:
        """A probe that failed after (maybe) part of the stream: keep what was measured."""
        if meter is None:
            return self._record(code, error_type, t0)
        inp, out, from_usage = meter.tokens
        return self._record(code, error_type, t0, ttft_s=meter.ttft, ttfot_s=meter.ttfot, streamed=True,
                            input_tokens=inp, output_tokens=out, tokens_from_usage=from_usage,
                            text_chunks=meter.text_chunks)
