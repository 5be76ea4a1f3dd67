"""Spend through the metering proxy to the real `opskit mock`, with the real openai SDK as the client:
the spend counter equals the configured prices times the tokens by type that the SDK's `usage` shows
(uncached input, cached input and output priced apart; reasoning billed as output), with the off-peak
discount for calls that end in the off-peak window. Also the run's prices from `--prices FILE`."""

from __future__ import annotations

import calendar
import time

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from opskit.cli import main
from opskit.core import pricing
from opskit.loadtest import gate
from opskit.loadtest.cli import load_prices
from opskit.shipped import folder
from opskit.sidecar.call_metrics import CallMetrics
from opskit.sidecar.proxy import start_proxy
from tests import test_proxy
from tests.test_proxy import MODEL, TARGET, _sdk

loop_thread = test_proxy.loop_thread  # the proxy's fixture

REASONER = "deepseek-reasoner"
PRICES = {"currency": "USD", "per_million_tokens": {MODEL: {"input": 0.27, "cached_input": 0.07, "output": 1.10},
                                                    REASONER: {"input": 0.55, "cached_input": 0.14, "output": 2.19}},
          "off_peak": [{"start": "16:30", "end": "00:30", "discount": 0.5}]}
NOON = calendar.timegm((2026, 1, 5, 12, 0, 0))    # on-peak (UTC)
NIGHT = calendar.timegm((2026, 1, 5, 23, 0, 0))   # off-peak: half price


def _calls(metrics_registry) -> float:
    return sum(s.value for m in metrics_registry.collect() if m.name == "opskit_llm_requests"
               for s in m.samples if s.name == "opskit_llm_requests_total")


def test_spend_is_prices_times_the_sdks_usage_by_token_type(start_mock, loop_thread):
    mock = start_mock("--ttft-ms", "5", "--ttft-jitter-ms", "0", "--itl-ms", "1", "--itl-jitter-ms", "0",
                      "--output-tokens-mean", "12", "--output-tokens-spread", "0")
    registry, now = CollectorRegistry(), [NOON]
    metrics = CallMetrics(registry, {TARGET: [MODEL, REASONER]}, {TARGET: pricing.parse(PRICES)},
                          clock=lambda: now[0])
    server = loop_thread.run(start_proxy("127.0.0.1", 0, mock.url, TARGET, metrics))
    try:
        client = _sdk(f"http://127.0.0.1:{server.port}/v1")
        system = "You are a careful assistant. " * 70  # ~500 tokens: the mock's context cache serves 7 units
        want: dict[str, float] = {MODEL: 0.0, REASONER: 0.0}
        seen = []
        plan = [(MODEL, False, NOON), (MODEL, True, NOON), (REASONER, True, NOON), (REASONER, False, NIGHT),
                (MODEL, True, NIGHT)]
        for i, (model, stream, at) in enumerate(plan):
            now[0] = at
            kw = {"model": model, "max_tokens": 12,
                  "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}]}
            if stream:
                usage = [c.usage for c in client.chat.completions.create(
                    stream=True, stream_options={"include_usage": True}, **kw) if c.usage][0]
            else:
                usage = client.chat.completions.create(**kw).usage
            deadline = time.monotonic() + 5  # the proxy records the call after the client's last byte
            while _calls(registry) < i + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert _calls(registry) == i + 1
            # The bill from the SDK's own view of usage (DeepSeek's shape: prompt_cache_hit_tokens).
            hit, p = usage.prompt_cache_hit_tokens, PRICES["per_million_tokens"][model]
            reasoning = usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else 0
            cost = ((usage.prompt_tokens - hit) * p["input"] + hit * p["cached_input"]
                    + usage.completion_tokens * p["output"]) / 1e6
            want[model] += cost * (0.5 if at == NIGHT else 1.0)
            seen.append((hit, reasoning))
        # The prices that differ were all exercised: cached input, reasoning (output), off-peak.
        assert any(hit > 0 for hit, _ in seen) and any(r > 0 for _, r in seen)
        for model in (MODEL, REASONER):
            got = registry.get_sample_value("opskit_llm_spend_total", {
                "target": TARGET, "source": "proxy", "model": model, "currency": "USD"})
            assert got == pytest.approx(want[model], rel=1e-9), model
    finally:
        loop_thread.run(server.close(grace_s=1))


def test_shipped_example_prices_parse_and_say_they_are_illustrative():
    path = folder("loadtests") / "example-prices.yaml"
    assert "ILLUSTRATIVE" in path.read_text()
    p = load_prices(str(path))
    assert p.currency == "USD" and MODEL in p.models and p.daily_budget is None


def test_bad_prices_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "prices.yaml"
    bad.write_text("currency: USD\nper_million_tokens: {m: {input: -1, output: 1}}\n")
    res = CliRunner().invoke(main, ["loadtest", "--prices", str(bad)])
    assert res.exit_code == 2
    assert f"{bad}: prices.per_million_tokens.m.input: expected a non-negative number" in res.output
    assert "Traceback" not in res.output
    missing = CliRunner().invoke(main, ["loadtest", "--prices", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "nope.yaml" in missing.output


def test_console_line_shows_tokens_by_type_and_cost():
    s = {"input_tokens": 1200, "cached_input_tokens": 640, "output_tokens": 300, "reasoning_tokens": 0,
         "cost": {"currency": "USD", "total": 0.00123, "by_model": {}, "unpriced_calls": 0}}
    assert gate.tokens_and_cost(s) == ("; tokens input 1200 (cached 640), output 300 (reasoning 0); "
                                       "estimated cost 0.0012 USD")
    assert gate.tokens_and_cost({**s, "cost": None}).endswith("(reasoning 0)")
    assert gate.tokens_and_cost({"input_tokens": 0, "output_tokens": 0}) == ""


@pytest.mark.parametrize("args, env, want", [
    ([], {}, "--prices loadtests/example-prices.yaml"),          # the embedded mock: illustrative prices
    (["CONFIG=x.yaml"], {}, None),                                 # a real target: its own prices or none
    (["TARGET=http://h"], {}, None),
    ([], {"OPSKIT_TARGET_URL": "http://h"}, None),
    (["TARGET=http://h", "PRICES=p.yaml"], {}, "--prices p.yaml"),
])
def test_make_loadtest_prices_only_the_mock_by_default(args, env, want):
    import os
    import shutil
    import subprocess

    from tests.conftest import ROOT

    if not shutil.which("make"):
        pytest.skip("make not installed")
    clean = {k: v for k, v in os.environ.items() if k not in ("OPSKIT_TARGET_URL", "TARGET", "CONFIG", "PRICES")}
    out = subprocess.run(["make", "-n", "loadtest", *args], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, timeout=30).stdout
    assert "opskit loadtest" in out
    assert ("--prices" in out) == (want is not None) and (want is None or want in out), out
