"""Rate limits, daily quotas and their headers, through the openai SDK and raw HTTP."""

from __future__ import annotations

import time

import openai
import pytest
from test_mock import CHAT, counters, http

pytestmark = pytest.mark.slow

FAST = ("--ttft-ms", "1", "--ttft-jitter-ms", "0", "--itl-ms", "0", "--itl-jitter-ms", "0")
MSG = [{"role": "user", "content": "hi"}]


def chat(mock, key: str | None = None, **extra):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http("POST", mock.api + "/chat/completions", {**CHAT, "max_tokens": 2, **extra}, headers)


def test_rpm_429_headers_and_sdk_retry_honours_retry_after(start_mock):
    mock = start_mock("--rpm", "2", "--rate-window-s", "2", *FAST)
    ok1, ok2 = chat(mock), chat(mock)
    assert ok1[0] == ok2[0] == 200
    assert ok1[1]["x-ratelimit-limit-requests"] == "2"
    assert ok1[1]["x-ratelimit-remaining-requests"] == "1" and ok2[1]["x-ratelimit-remaining-requests"] == "0"
    assert ok2[1]["x-ratelimit-reset-requests"] in ("1s", "2s")
    status, hdrs, body = chat(mock)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert hdrs["Retry-After"] in ("1", "2") and hdrs["x-ratelimit-remaining-requests"] == "0"

    no_retry = openai.OpenAI(base_url=mock.api, api_key="x", max_retries=0, timeout=10)
    with pytest.raises(openai.RateLimitError) as err:
        no_retry.chat.completions.create(model="deepseek-chat", messages=MSG)
    retry_after = int(err.value.response.headers["retry-after"])
    one_retry = openai.OpenAI(base_url=mock.api, api_key="x", max_retries=1, timeout=10)
    t0 = time.monotonic()
    resp = one_retry.chat.completions.create(model="deepseek-chat", messages=MSG, max_tokens=2)
    waited = time.monotonic() - t0
    assert resp.usage.completion_tokens >= 1
    assert retry_after - 0.5 <= waited < retry_after + 3     # it slept Retry-After, not its own backoff
    c = counters(mock)
    assert c["requests"] == {"200": 3, "429": 3}


def test_tpm_and_per_key_windows(start_mock, monkeypatch):
    monkeypatch.setenv("OPSKIT_MOCK_API_KEYS", "sk-a,sk-b")
    mock = start_mock("--auth", "bearer", "--tpm", "30", *FAST)
    # CHAT's prompt is 7 tokens (27 chars) and max_tokens 2: 9 tokens a request -> the 4th passes 30.
    results = [chat(mock, "sk-a") for _ in range(4)]
    assert [r[0] for r in results] == [200, 200, 200, 429]
    assert results[-1][2]["error"]["type"] == "tokens"
    assert results[0][1]["x-ratelimit-limit-tokens"] == "30"
    remaining = [int(r[1]["x-ratelimit-remaining-tokens"]) for r in results[:3]]
    assert remaining == sorted(remaining, reverse=True) and remaining[0] < 30
    assert chat(mock, "sk-b")[0] == 200             # another key has its own window


def test_daily_quota_403_then_reset(start_mock):
    mock = start_mock("--daily-quota", "2", *FAST)
    assert [chat(mock)[0] for _ in range(2)] == [200, 200]
    status, _, body = chat(mock)
    assert status == 403 and body["error"]["code"] == "quota_exhausted" and "quota" in body["error"]["message"]
    client = openai.OpenAI(base_url=mock.api, api_key="x", max_retries=0, timeout=10)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="deepseek-chat", messages=MSG)
    status, _, zeroed = http("POST", mock.admin_url + "/admin/reset")
    assert status == 200 and zeroed["requests"] == {} and zeroed["tokens"] == {"input": 0, "output": 0}
    assert chat(mock)[0] == 200


def test_limits_change_at_runtime(mock_server):
    assert "x-ratelimit-limit-requests" not in chat(mock_server)[1]
    status, _, limits = http("PUT", mock_server.admin_url + "/admin/limits", {"rpm": 1, "window_s": 30})
    assert status == 200 and limits["rpm"] == 1 and limits["tpm"] is None
    assert chat(mock_server)[0] == 200 and chat(mock_server)[0] == 429
    http("PUT", mock_server.admin_url + "/admin/limits", {"rpm": None})
    status, hdrs, _ = chat(mock_server)
    assert status == 200 and "x-ratelimit-limit-requests" not in hdrs
