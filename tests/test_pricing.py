"""Prices from a target's config, the cost of a call, and the spend counter."""

from __future__ import annotations

import calendar

import pytest
from prometheus_client import CollectorRegistry

from opskit.core import config, pricing
from opskit.core.config import ConfigError
from opskit.core.records import CallRecord
from opskit.sidecar.call_metrics import CallMetrics

SPEC = {"currency": "usd", "per_million_tokens": {"deepseek-chat": {"input": 0.27, "cached_input": 0.07, "output": 1.10},
                                                  "cheap": {"input": 1, "output": 2}},
        "off_peak": [{"start": "16:30", "end": "00:30", "discount": 0.5}]}
NOON = calendar.timegm((2026, 1, 5, 12, 0, 0))   # on-peak (UTC)
NIGHT = calendar.timegm((2026, 1, 5, 23, 59, 0))  # in the off-peak window that wraps past midnight
EARLY = calendar.timegm((2026, 1, 6, 0, 15, 0))   # still in it, after midnight


def test_cost_bills_uncached_cached_and_output_tokens_with_off_peak_discount():
    p = pricing.parse(SPEC)
    assert p.currency == "USD"
    # 1M input of which 400k cached, 100k output: 0.6 x 0.27 + 0.4 x 0.07 + 0.1 x 1.10
    assert p.cost("deepseek-chat", 1_000_000, 400_000, 100_000, NOON) == pytest.approx(0.162 + 0.028 + 0.11)
    assert p.cost("deepseek-chat", 1_000_000, 400_000, 100_000, NIGHT) == pytest.approx(0.15)
    assert p.cost("deepseek-chat", 1_000_000, 400_000, 100_000, EARLY) == pytest.approx(0.15)
    assert p.cost("cheap", 1_000_000, 1_000_000, 0, NOON) == pytest.approx(1.0)  # cached_input defaults to input
    assert p.cost("unpriced", 1000, 0, 1000, NOON) is None


@pytest.mark.parametrize("bad, key", [
    ({**SPEC, "currency": 5}, "t.prices.currency"),
    ({**SPEC, "per_million_tokens": {}}, "t.prices.per_million_tokens"),
    ({**SPEC, "per_million_tokens": {"m": {"input": -1, "output": 1}}}, "t.prices.per_million_tokens.m.input"),
    ({**SPEC, "per_million_tokens": {"m": {"input": 1}}}, "t.prices.per_million_tokens.m"),
    ({**SPEC, "off_peak": [{"start": "25:00", "end": "01:00", "discount": 0.5}]}, "t.prices.off_peak[0].start"),
    ({**SPEC, "off_peak": [{"start": "01:00", "end": "02:00", "discount": 1.5}]}, "t.prices.off_peak[0].discount"),
    ({**SPEC, "tax": 1}, "t.prices"),
    ({**SPEC, "daily_budget": 0}, "t.prices.daily_budget"),
    ({**SPEC, "daily_budget": "50 USD"}, "t.prices.daily_budget"),
])
def test_malformed_prices_name_the_key(bad, key):
    with pytest.raises(pricing.PricingError) as info:
        pricing.parse(bad, "t.prices")
    assert info.value.key == key


def test_config_carries_prices_and_reports_bad_ones_as_config_errors():
    cfg = config.parse({"targets": [{"name": "ds", "base_url": "https://api.deepseek.com", "prices": SPEC}]})
    assert cfg.target("ds").prices == pricing.parse(SPEC)
    assert config.parse({"targets": [{"name": "ds", "base_url": "https://x.example"}]}).target().prices is None
    with pytest.raises(ConfigError) as info:
        config.parse({"targets": [{"name": "ds", "base_url": "https://x.example", "prices": {"currency": "USD"}}]})
    assert "targets[0].prices.per_million_tokens" in str(info.value)


def test_spend_counter_per_target_model_and_currency():
    reg, now = CollectorRegistry(), [NOON]
    m = CallMetrics(reg, {"ds": ["deepseek-chat"], "free": ["deepseek-chat"]}, {"ds": pricing.parse(SPEC)},
                    clock=lambda: now[0])
    call = dict(source="proxy", model="deepseek-chat", code=200, error_type="", duration_s=1.0,
                input_tokens=1_000_000, cached_input_tokens=400_000, output_tokens=100_000, tokens_from_usage=True)
    m.observe(CallRecord("ds", **call))
    now[0] = NIGHT
    m.observe(CallRecord("ds", **call))
    m.observe(CallRecord("free", **call))  # a target without prices has no spend
    labels = {"target": "ds", "source": "proxy", "model": "deepseek-chat", "currency": "USD"}
    assert reg.get_sample_value("opskit_llm_spend_total", labels) == pytest.approx(0.3 + 0.15)
    assert reg.get_sample_value("opskit_llm_spend_total", {**labels, "target": "free"}) is None
    assert reg.get_sample_value("opskit_llm_tokens_total", {**{k: v for k, v in labels.items() if k != "currency"},
                                                            "token_type": "cached_input"}) == 800_000


def test_daily_budget_is_optional_and_exported_in_the_prices_currency():
    assert pricing.parse(SPEC).daily_budget is None
    assert pricing.parse({**SPEC, "daily_budget": 50}).daily_budget == 50.0
    from opskit.sidecar.exporter_server import build_registry

    cfg = config.parse({"targets": [
        {"name": "ds", "base_url": "https://api.deepseek.com", "prices": {**SPEC, "daily_budget": 50}},
        {"name": "nobudget", "base_url": "https://b.example", "prices": SPEC},
        {"name": "free", "base_url": "https://c.example"}]})
    reg, _ = build_registry(cfg)
    assert reg.get_sample_value("opskit_llm_spend_daily_budget", {"target": "ds", "currency": "USD"}) == 50.0
    # no budget, no series: the spend alert is not armed for those targets
    assert [s for f in reg.collect() if f.name == "opskit_llm_spend_daily_budget" for s in f.samples
            if s.labels["target"] != "ds"] == []
