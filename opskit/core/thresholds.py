"""Every alert and SLO threshold, in one place.

The alert rules (alerts/), the dashboards' threshold lines (dashboards/) and the load-test gate
(opskit.loadtest.slo) all read these values; tests fail when any of them drifts. Nothing is read at
import time: callers ask `load()`, so a bad override file is a one-line error of the command that
reads it, never an import failure. Values are in base
units: seconds and 0-1 ratios. Durations (`for:`) are Prometheus duration strings.

An operator may override values with a YAML file of the same field names
(`OPSKIT_THRESHOLDS=/path/thresholds.yaml`); generated rules and dashboards are then rebuilt.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Thresholds:
    """Agreed thresholds. Field names are stable: they appear in override files."""

    # Time to first token, p95, seconds: successful streamed calls only (a non-streamed call has none).
    ttft_p95_seconds: float = 0.5
    ttft_for: str = "5m"
    # Request duration, p90, seconds, of successful calls; streamed and non-streamed calls (the
    # `stream` label) are each held to it apart, and the load-test gate checks it over the run's calls.
    duration_p90_seconds: float = 2.0
    duration_for: str = "5m"
    # Share of requests that fail (any error_type), warning and critical.
    error_ratio: float = 0.02
    error_for: str = "5m"
    error_ratio_critical: float = 0.15
    error_critical_for: str = "2m"
    # Requests per second (over 5m, per target) below which the ratio alerts (error rate, 429 share)
    # stay silent: with few calls a ratio is noise. A target that only the canary probe calls sees
    # 1 call a minute per exporter at the default 60 s interval, so one failed canary is 20 % of a
    # 5-minute window and would page. 0.1/s (6 a minute, 30 calls in the window) sits above the
    # probe-only traffic of the shipped deployments (deploy/model-server.yaml: 2 exporters every
    # 30 s = 4/min; deploy/app-hosted.yaml: 3 every 60 s = 3/min), tested in tests/test_alerts.py,
    # and far below real traffic. Keep it above (exporters x 60 / probe interval_s) calls a minute
    # divided by 60. Quiet targets are still watched by LLMProbeFailing and the burn-rate alerts,
    # whose long windows need many failures (at 1 call a minute, 9 failed canaries in an hour) and
    # so are not guarded. 0 turns the guard off.
    min_request_rate: float = 0.1
    # GPU utilization (0-1) and memory use (used/total).
    gpu_utilization_ratio: float = 0.9
    gpu_utilization_for: str = "5m"
    gpu_memory_ratio: float = 0.95
    gpu_memory_for: str = "10m"
    # GPU health: how long clocks must be held down by heat or the power cap before a
    # warning, and the XID codes that mean a GPU needs a reset or is failing (comma-separated; NVIDIA's
    # XID catalogue: 48 double-bit ECC, 63/64 row remap recorded/failed, 74 NVLink, 79 fell off the
    # bus, 94/95 contained/uncontained ECC), which page.
    gpu_throttle_for: str = "10m"
    gpu_critical_xids: str = "48,63,64,74,79,94,95"
    # Share of requests answered 429.
    rate_limited_ratio: float = 0.05
    rate_limited_for: str = "10m"
    # Share of a configured daily quota used.
    quota_used_ratio: float = 0.8
    # Spend: how long the projected daily spend (the last hour's rate x 24 h) must stay above a target's
    # daily budget. The budget itself belongs to the target's prices (`prices.daily_budget`, in their
    # currency, opskit.core.pricing): a target without one has no spend alert.
    spend_for: str = "15m"
    # Probe failing for this long.
    probe_failing_for: str = "5m"
    # Exporter scrape target down / GPU series missing.
    exporter_down_for: str = "2m"
    gpu_missing_for: str = "10m"
    # Model-server engines (vLLM, SGLang, TGI; opskit.opscode.engine_rules): requests waiting in
    # the engine, KV-cache usage (llm-d alerts at 90 % for 10 min), preemptions per second, the
    # engine's /metrics unreachable, and GPUs under this busy ratio while requests wait (a ticket).
    engine_waiting_requests: float = 10.0
    engine_queue_for: str = "5m"
    engine_kv_cache_ratio: float = 0.9
    engine_kv_cache_for: str = "10m"
    engine_preemptions_per_second: float = 0.0
    engine_preempting_for: str = "5m"
    engine_down_for: str = "2m"
    engine_gpu_idle_ratio: float = 0.3
    engine_gpu_idle_for: str = "30m"
    # Availability SLO (share of requests without a server-side error) over 30 days.
    availability_slo: float = 0.99
    # Release gate only (opskit loadtest): an open-loop run must achieve this share of the rate it
    # asked for, and a throttling target may accept up to its limit per window times (1 + tolerance)
    # (window-boundary jitter). loadtests/slo.yaml overrides these, and the three above, per scenario.
    achieved_rate_ratio: float = 0.95
    throttling_limit_tolerance: float = 0.05
    # Release gate's circuit breaker (opskit.loadtest.breaker): a scenario stops when errors other
    # than its expected 429s reach this share of the requests of the last `circuit_window_s` seconds
    # (with at least `circuit_min_requests` in the window): the 15 % error threshold of DeepSeek's
    # integration guidance, as error_ratio_critical. 1 (or a window of 0) turns it off.
    circuit_error_ratio: float = 0.15
    circuit_window_s: float = 10.0
    circuit_min_requests: float = 20


def load(path: str | os.PathLike[str] | None = None) -> Thresholds:
    """Defaults, overridden by a YAML file (argument, else $OPSKIT_THRESHOLDS) when one is given."""
    path = path or os.environ.get("OPSKIT_THRESHOLDS")
    if not path:
        return Thresholds()
    import yaml

    from opskit.core.config import ConfigError

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(str(p), "", f"a readable YAML mapping ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(str(p), "", "a mapping of threshold names to values")
    fields = {f.name: f for f in dataclasses.fields(Thresholds)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(str(p), key, f"one of {', '.join(sorted(fields))}")
        want = str if fields[key].type == "str" else float
        if want is float and not isinstance(value, int | float) or want is str and not isinstance(value, str):
            raise ConfigError(str(p), key, "a number" if want is float else "a duration such as '5m'")
    return dataclasses.replace(Thresholds(), **data)

