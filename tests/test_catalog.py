"""The catalogue and thresholds: conventions, bucket edges, the model cap, call series."""

import dataclasses

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from opskit.core import catalog, records, thresholds
from opskit.core.config import ConfigError
from opskit.core.records import CallRecord
from opskit.sidecar.call_metrics import CallMetrics


def test_names_follow_prometheus_conventions():
    for m in catalog.ALL:
        assert m.name.startswith("opskit_"), m.name
        assert (m.type == catalog.COUNTER) == m.name.endswith("_total"), m.name
        if m.unit in ("seconds", "bytes", "ratio", "celsius", "watts"):
            assert m.name.endswith(f"_{m.unit}"), m.name
        assert m.help and m.help.endswith("."), m.name
        assert all(lbl.islower() and " " not in lbl for lbl in m.labels)
        if m.type == catalog.HISTOGRAM:
            assert list(m.buckets) == sorted(set(m.buckets))


def test_default_thresholds_sit_on_bucket_edges():
    for name, (value, buckets) in catalog.threshold_edges(thresholds.Thresholds()).items():
        assert value in buckets, name


def test_reasoning_model_latencies_land_in_a_finite_bucket():
    # a reasoning model may think for minutes; a quantile that reads +Inf says nothing
    reg = CollectorRegistry()
    m = CallMetrics(reg, {"t": ["r1"]})
    m.observe(CallRecord("t", "proxy", "r1", 200, "", duration_s=1500.0, ttft_s=300.0, streamed=True,
                         output_tokens=10))
    base = {"target": "t", "source": "proxy", "model": "r1"}
    assert reg.get_sample_value("opskit_llm_time_to_first_token_seconds_bucket", {**base, "le": "160.0"}) == 0
    assert reg.get_sample_value("opskit_llm_time_to_first_token_seconds_bucket", {**base, "le": "320.0"}) == 1
    dur = {**base, "stream": "true"}
    assert reg.get_sample_value("opskit_llm_request_duration_seconds_bucket", {**dur, "le": "1200.0"}) == 0
    assert reg.get_sample_value("opskit_llm_request_duration_seconds_bucket", {**dur, "le": "1800.0"}) == 1
    # and the series stay bounded: at most 30 edges a histogram child
    assert all(len(h.buckets) <= 30 for h in catalog.ALL if h.type == catalog.HISTOGRAM)


def test_error_types_match_records():
    consts = {getattr(records, n) for n in ("OK", "RATE_LIMITED", "CLIENT_ERROR", "SERVER_ERROR", "TIMEOUT",
                                            "CONNECTION", "STREAM_BROKEN", "CLIENT_DISCONNECT")}
    assert consts == set(catalog.ERROR_TYPES)
    assert records.error_type_for_status(429) == "rate_limited"
    assert records.error_type_for_status(404) == "client_error"
    assert records.error_type_for_status(503) == "server_error"
    assert records.error_type_for_status(200) == ""


def test_threshold_override_file(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("ttft_p95_seconds: 0.25\nerror_for: 10m\n")
    t = thresholds.load(p)
    assert t.ttft_p95_seconds == 0.25 and t.error_for == "10m"
    assert dataclasses.replace(t, ttft_p95_seconds=0.5) == dataclasses.replace(thresholds.Thresholds(), error_for="10m")
    p.write_text("ttft_p95: 1\n")
    with pytest.raises(ConfigError, match="ttft_p95: expected one of"):
        thresholds.load(p)
    p.write_text("ttft_p95_seconds: fast\n")
    with pytest.raises(ConfigError, match="a number"):
        thresholds.load(p)


def test_call_metrics_from_records():
    reg = CollectorRegistry()
    cm = CallMetrics(reg, {"mock": ["deepseek-chat"]})
    cm.started("mock", "proxy")
    assert reg.get_sample_value("opskit_llm_requests_in_flight", {"target": "mock", "source": "proxy"}) == 1
    cm.finished(CallRecord("mock", "proxy", "deepseek-chat", 200, "", duration_s=1.0, ttft_s=0.1,
                           input_tokens=5, output_tokens=10, streamed=True, ratelimit_remaining_requests=7))
    cm.observe(CallRecord("mock", "proxy", "user-supplied-model-name", 429, "rate_limited", duration_s=0.01))
    base = {"target": "mock", "source": "proxy", "model": "deepseek-chat"}
    assert reg.get_sample_value("opskit_llm_requests_in_flight", {"target": "mock", "source": "proxy"}) == 0
    assert reg.get_sample_value("opskit_llm_requests_total", {**base, "code": "200", "error_type": ""}) == 1
    assert reg.get_sample_value("opskit_llm_requests_total",
                                {**base, "model": "other", "code": "429", "error_type": "rate_limited"}) == 1
    assert reg.get_sample_value("opskit_llm_time_to_first_token_seconds_count", base) == 1
    assert reg.get_sample_value("opskit_llm_time_per_output_token_seconds_sum", base) == pytest.approx(0.1)
    assert reg.get_sample_value("opskit_llm_tokens_total", {**base, "token_type": "output"}) == 10
    assert reg.get_sample_value("opskit_llm_ratelimit_remaining_requests", {"target": "mock", "source": "proxy"}) == 7
    text = generate_latest(reg).decode()
    assert "user-supplied-model-name" not in text
