"""What the call series mean, through the metering proxy to the real `opskit mock`, with
the real openai SDK as the client: TTFT and TPOT of streamed calls only, a `stream` label on the
duration histogram, and latency of successful calls only.

The quantiles are computed from the exported buckets as Prometheus' histogram_quantile does, so
"the alert does not fire" is checked against the numbers the alert rule would read.
"""

from __future__ import annotations

import math

import openai
import pytest
from prometheus_client.utils import floatToGoString

from opskit.core import catalog
from opskit.core.thresholds import Thresholds
from tests import test_proxy
from tests.test_proxy import MODEL, TARGET, _sdk

loop_thread, proxy_factory = test_proxy.loop_thread, test_proxy.proxy_factory  # the proxy's fixtures

LABELS = {"target": TARGET, "source": "proxy", "model": MODEL}


def histogram_quantile(registry, name: str, q: float, **labels) -> float:
    """Prometheus' histogram_quantile over one child's cumulative buckets (linear in a bucket)."""
    edges = [(le, registry.get_sample_value(f"{name}_bucket", {**labels, "le": floatToGoString(le)}) or 0.0)
             for le in (*catalog.BY_NAME[name].buckets, math.inf)]
    total = edges[-1][1]
    if not total:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in edges:
        if count >= rank:
            if le == math.inf:
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _chat(client, i: int, stream: bool) -> None:
    kw = {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 40}
    if stream:
        chunks = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        assert client.chat.completions.create(**kw).choices[0].message.content


def test_mixed_streamed_and_plain_calls_do_not_fire_ttft(start_mock, proxy_factory):
    # Each call takes >= 20 ms + 40 x 15 ms = 620 ms; a streamed call shows its first token after ~20 ms.
    # Recording a non-streamed call's duration as its TTFT (the old behaviour) put half the calls
    # above the 500 ms TTFT threshold and fired LLMHighTimeToFirstToken.
    mock = start_mock("--ttft-ms", "20", "--ttft-jitter-ms", "0", "--itl-ms", "15", "--itl-jitter-ms", "0",
                      "--output-tokens-mean", "40", "--output-tokens-spread", "0")
    p = proxy_factory(mock.url)
    client = _sdk(p.url + "/v1")
    for i in range(12):
        _chat(client, i, stream=bool(i % 2))
    assert p.settle(12) == 12 and p.by_code() == {"200": 12}
    reg, t = p.registry, Thresholds()
    ttft = catalog.LLM_TTFT.name
    assert reg.get_sample_value(f"{ttft}_count", LABELS) == 6  # the streamed calls, and only them
    assert reg.get_sample_value(f"{catalog.LLM_TPOT.name}_count", LABELS) == 6
    assert histogram_quantile(reg, ttft, 0.95, **LABELS) <= t.ttft_p95_seconds  # the alert's condition is false
    dur = catalog.LLM_DURATION.name
    for stream in ("true", "false"):
        assert reg.get_sample_value(f"{dur}_count", {**LABELS, "stream": stream}) == 6
        # every call of either kind really took longer than the TTFT threshold (the mock's schedule)
        assert reg.get_sample_value(f"{dur}_bucket", {**LABELS, "stream": stream, "le": "0.5"}) == 0
    assert {r.ttft_s is None for r in p.metrics.records if not r.streamed} == {True}


def test_429_storm_does_not_lower_p90(start_mock, proxy_factory):
    # 10 requests a minute: the first 10 calls are answered, every later one in the minute gets a 429
    mock = start_mock("--ttft-ms", "20", "--ttft-jitter-ms", "0", "--itl-ms", "10", "--itl-jitter-ms", "0",
                      "--output-tokens-mean", "40", "--output-tokens-spread", "0", "--rpm", "10")
    p = proxy_factory(mock.url)
    client = _sdk(p.url + "/v1")
    for i in range(10):
        _chat(client, i, stream=True)
    assert p.settle(10) == 10
    reg, dur = p.registry, catalog.LLM_DURATION.name
    labels = {**LABELS, "stream": "true"}
    before = histogram_quantile(reg, dur, 0.9, **labels), histogram_quantile(reg, catalog.LLM_TTFT.name, 0.9, **LABELS)
    assert before[0] > 0.25  # 40 tokens at 10 ms: no call is faster than its schedule

    for i in range(40):  # the storm: 40 fast 429s, four times the successful calls
        with pytest.raises(openai.RateLimitError):
            _chat(client, 100 + i, stream=True)
    assert p.settle(50) == 50
    assert p.count(429, "rate_limited") == 40  # the failures are counted, by type...
    assert reg.get_sample_value(f"{dur}_count", labels) == 10  # ...and observed by no latency histogram
    after = histogram_quantile(reg, dur, 0.9, **labels), histogram_quantile(reg, catalog.LLM_TTFT.name, 0.9, **LABELS)
    assert after == before


def test_tokens_by_type_through_the_proxy(start_mock, proxy_factory):
    # The mock answers in DeepSeek's shape with a context cache in 64-token units: a request whose
    # messages start with a prefix seen before hits in whole units. The proxy counts cached input
    # and reasoning as what they are: parts of input and output.
    mock = start_mock("--ttft-ms", "5", "--ttft-jitter-ms", "0", "--itl-ms", "1", "--itl-jitter-ms", "0",
                      "--output-tokens-mean", "12", "--output-tokens-spread", "0")
    p = proxy_factory(mock.url)
    client = _sdk(p.url + "/v1")
    system = "You are a careful assistant. " * 70  # 2030 characters, ~500 tokens: 7 whole 256-character units
    seen = []
    for i, (model, stream) in enumerate([(MODEL, False), (MODEL, True), ("deepseek-reasoner", False),
                                         ("deepseek-reasoner", True)]):
        kw = {"model": model, "messages": [{"role": "system", "content": system},
                                           {"role": "user", "content": f"question {i}"}], "max_tokens": 12}
        if stream:
            usage = [c.usage for c in client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kw) if c.usage][0]
        else:
            usage = client.chat.completions.create(**kw).usage
        seen.append((model, usage.prompt_tokens, usage.completion_tokens, usage.prompt_cache_hit_tokens,
                     (usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else 0)))
        assert usage.prompt_cache_hit_tokens + usage.prompt_cache_miss_tokens == usage.prompt_tokens
    assert [s[3] for s in seen] == [0, 7 * 64, 7 * 64, 7 * 64]  # the first call fills the cache
    assert seen[0][4] == seen[1][4] == 0 and seen[2][4] > 0 and seen[3][4] > 0  # the reasoner reasons
    assert p.settle(4) == 4
    for model, label in ((MODEL, MODEL), ("deepseek-reasoner", "other")):
        mine = [s for s in seen if s[0] == model]
        for token_type, col in (("input", 1), ("output", 2), ("cached_input", 3), ("reasoning", 4)):
            want = sum(s[col] for s in mine)
            got = p.registry.get_sample_value("opskit_llm_tokens_total",
                                              {**LABELS, "model": label, "token_type": token_type})
            assert (got or 0) == want, (model, token_type)
