"""The active probe: its schedule (fake clock), and real probes against the real `opskit mock`."""

from __future__ import annotations

import asyncio
import logging
import socket

import httpx2 as httpx
import pytest
from prometheus_client import CollectorRegistry

from opskit.core.config import AuthConfig, ProbeConfig, Secret, Target
from opskit.sidecar.call_metrics import CallMetrics
from opskit.sidecar.probe import Prober, next_slot

MODEL = "deepseek-chat"
FAST = ("--ttft-ms", "5", "--ttft-jitter-ms", "0", "--itl-ms", "1", "--itl-jitter-ms", "0", "--output-tokens-spread", "0")
KEY = "sk-probe-secret-0123456789"


def _prober(base_url: str, auth: AuthConfig | None = None, **cfg) -> tuple[Prober, CollectorRegistry]:
    registry = CollectorRegistry()
    target = Target(name="m", base_url=base_url, models=(MODEL,), auth=auth or AuthConfig())
    metrics = CallMetrics(registry, {"m": [MODEL]})
    return Prober(target, ProbeConfig(**{"timeout_s": 5.0, **cfg}), metrics, registry), registry


def _get(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


def _requests(registry: CollectorRegistry, code: int, error_type: str) -> float:
    return _get(registry, "opskit_llm_requests_total", target="m", source="probe", model=MODEL, code=str(code),
                error_type=error_type) or 0.0


def _probe(prober: Prober):
    async def run():
        try:
            return await prober.probe_once()
        finally:
            await prober.close()
    return asyncio.run(run())


# ---------------------------------------------------------------- schedule

def test_next_slot_skips_missed_slots():
    assert next_slot(100.0, 10.0, 100.3, 0) == (1, 110.0)      # quick probe: next slot
    assert next_slot(100.0, 10.0, 110.0, 0) == (1, 110.0)      # exactly due: run it now
    assert next_slot(100.0, 10.0, 125.0, 1) == (3, 130.0)      # overran slot 2: skip it
    assert next_slot(100.0, 10.0, 100.0, 4) == (5, 150.0)      # never goes back


class FakeTime:
    """A virtual clock: sleeping advances it; probes take the durations they are given."""

    def __init__(self, durations: list[float]) -> None:
        self.now, self.durations, self.starts, self.sleeps = 1000.0, durations, [], []

    def clock(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s
        if len(self.starts) >= len(self.durations):
            raise asyncio.CancelledError

    async def probe_once(self):
        self.starts.append(self.now - 1000.0)
        self.now += self.durations[len(self.starts) - 1]
        if len(self.starts) == 2:
            raise RuntimeError("a bug in one probe must not stop the loop")


def test_schedule_is_fixed_rate_without_drift():
    fake = FakeTime([0.3, 0.3, 2.5, 0.1, 0.99, 0.2])
    registry = CollectorRegistry()
    target = Target(name="m", base_url="http://127.0.0.1:9", models=(MODEL,))
    prober = Prober(target, ProbeConfig(interval_s=1.0), CallMetrics(registry, {"m": [MODEL]}), registry,
                    clock=fake.clock, sleep=fake.sleep)
    prober.probe_once = fake.probe_once
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(prober.run_forever())
    # first at once; then on the 1 s grid whatever each probe took; the overrun skips slots 3 and 4
    assert fake.starts == pytest.approx([0.0, 1.0, 2.0, 5.0, 6.0, 7.0])


def test_probers_share_one_registry():
    registry = CollectorRegistry()
    metrics = CallMetrics(registry, {"a": [MODEL], "b": [MODEL]})
    a = Prober(Target(name="a", base_url="http://127.0.0.1:9"), ProbeConfig(), metrics, registry)
    b = Prober(Target(name="b", base_url="http://127.0.0.1:9"), ProbeConfig(), metrics, registry)
    assert a.success is b.success and a.duration is b.duration


# ---------------------------------------------------------------- against the real mock

def test_probe_success_against_mock(start_mock):
    mock = start_mock(*FAST, "--output-tokens-mean", "20")
    prober, registry = _prober(mock.api, max_tokens=8)
    rec = _probe(prober)
    assert rec.ok and rec.code == 200 and rec.streamed and rec.source == "probe"
    assert rec.output_tokens == 8 and rec.tokens_from_usage and rec.input_tokens > 0  # max_tokens honoured
    assert 0 < rec.ttft_s <= rec.duration_s
    assert _get(registry, "opskit_probe_success", target="m") == 1
    assert _get(registry, "opskit_probe_duration_seconds", target="m") == pytest.approx(rec.duration_s)
    assert _requests(registry, 200, "") == 1
    counters = httpx.get(mock.admin_url + "/admin/counters", timeout=5).json()
    assert counters["requests"] == {"200": 1} and counters["tokens"]["output"] == 8


def test_probe_authenticates_and_never_logs_the_key(start_mock, caplog):
    mock = start_mock(*FAST, "--auth", "bearer", "--api-key", KEY)
    caplog.set_level(logging.DEBUG)
    good, registry = _prober(mock.api, AuthConfig(scheme="bearer", api_key=Secret(KEY)))
    assert _probe(good).ok
    bad, bad_registry = _prober(mock.api, AuthConfig(scheme="bearer", api_key=Secret("sk-wrong")))
    rec = _probe(bad)
    assert (rec.code, rec.error_type) == (401, "client_error")
    assert _get(bad_registry, "opskit_probe_success", target="m") == 0
    assert KEY not in caplog.text and "sk-wrong" not in caplog.text


@pytest.mark.parametrize("scheme", ["hmac", "oauth2"])
def test_probe_signs_with_every_scheme(start_mock, scheme):
    if scheme == "hmac":
        mock = start_mock(*FAST, "--auth", "hmac", "--api-key", f"kid-1:{KEY}")
        auth = AuthConfig(scheme="hmac", api_key=Secret("kid-1"), secret_key=Secret(KEY))
    else:
        mock = start_mock(*FAST, "--auth", "oauth2", "--client", f"probe-client:{KEY}")
        auth = AuthConfig(scheme="oauth2", token_url=mock.url + "/oauth/token", client_id="probe-client",
                          client_secret=Secret(KEY))
    prober, registry = _prober(mock.api, auth)
    assert _probe(prober).ok and _get(registry, "opskit_probe_success", target="m") == 1


def test_probe_rate_limited(start_mock):
    mock = start_mock(*FAST, "--rpm", "1")
    prober, registry = _prober(mock.api)

    async def twice():
        try:
            return [await prober.probe_once(), await prober.probe_once()]
        finally:
            await prober.close()

    first, second = asyncio.run(twice())
    assert first.ok and (second.code, second.error_type) == (429, "rate_limited")
    assert _get(registry, "opskit_probe_success", target="m") == 0
    assert _get(registry, "opskit_llm_ratelimit_remaining_requests", target="m", source="probe") == 0


def test_probe_unreachable_and_timeout(start_mock):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    prober, registry = _prober(f"http://127.0.0.1:{dead}/v1")
    rec = _probe(prober)
    assert (rec.code, rec.error_type) == (0, "connection")
    assert _get(registry, "opskit_probe_success", target="m") == 0 and _requests(registry, 0, "connection") == 1

    mock = start_mock(*FAST, "--hang-rate", "1")
    prober, registry = _prober(mock.api, timeout_s=0.3)
    rec = _probe(prober)
    assert (rec.code, rec.error_type) == (0, "timeout") and 0.3 <= rec.duration_s < 2
    assert _requests(registry, 0, "timeout") == 1


def test_probe_logs_when_it_starts_failing_and_when_it_recovers(caplog):
    from opskit.core.records import CallRecord

    caplog.set_level(logging.INFO, logger="opskit.sidecar.probe")
    prober, _ = _prober("http://127.0.0.1:9/v1")
    outcomes = [(200, ""), (0, "connection"), (0, "connection"), (503, "server_error"), (200, ""), (200, "")]
    for code, error_type in outcomes:
        prober._log_change(CallRecord(target="m", source="probe", model=MODEL, code=code, error_type=error_type,
                                      duration_s=0.1))
    assert [r.getMessage() for r in caplog.records] == [
        "probe of m failing: connection (no response)",  # once, not once per failed probe
        "probe of m succeeding again",
    ]


def test_probe_failing_before_the_call_logs_once(caplog):
    # the OAuth2 token endpoint is down: every probe fails before its call, and says so once
    caplog.set_level(logging.INFO, logger="opskit.sidecar.probe")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    auth = AuthConfig(scheme="oauth2", token_url=f"http://127.0.0.1:{dead}/oauth/token", client_id="app",
                      client_secret=Secret("cs-secret"))
    prober, registry = _prober(f"http://127.0.0.1:{dead}/v1", auth=auth)

    async def twice():
        try:
            return [await prober.probe_once() for _ in range(2)]
        finally:
            await prober.close()
    recs = asyncio.run(twice())
    assert [(r.code, r.error_type) for r in recs] == [(0, "connection")] * 2
    assert _requests(registry, 0, "connection") == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("probe of m failing: connection (failed before the call: ")
    assert "cs-secret" not in caplog.text


def test_probe_broken_stream_counted(start_mock):
    mock = start_mock(*FAST, "--output-tokens-mean", "20", "--cut-rate", "1")
    prober, registry = _prober(mock.api, max_tokens=16)
    rec = _probe(prober)
    assert (rec.code, rec.error_type) == (200, "stream_broken")
    assert _get(registry, "opskit_probe_success", target="m") == 0


def test_run_forever_probes_until_cancelled(start_mock):
    mock = start_mock(*FAST)
    prober, registry = _prober(mock.api, interval_s=0.1, max_tokens=2)

    async def run():
        task = asyncio.create_task(prober.run_forever())
        await asyncio.sleep(0.35)  # probes at 0, 0.1, 0.2, 0.3
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert 3 <= _requests(registry, 200, "") <= 5
    assert prober._session is None  # closed on the way out
