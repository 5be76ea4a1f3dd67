"""The mock server through real clients: the openai SDK (sync and async) and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import openai
import pytest

from opskit.core.sse import SSEParser

pytestmark = pytest.mark.slow


def http(method: str, url: str, body: object = None, headers: dict | None = None, timeout: float = 10.0):
    """(status, headers, parsed JSON or raw text) of one request; never raises on HTTP errors."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode()


def counters(mock) -> dict:
    return http("GET", mock.admin_url + "/admin/counters")[2]


CHAT = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Say hello to the operators."}]}


def test_sdk_sync_non_streamed_and_streamed(start_mock):
    mock = start_mock("--ttft-ms", "5", "--itl-ms", "1", "--seed", "3")
    client = openai.OpenAI(base_url=mock.api, api_key="unused", max_retries=0, timeout=10)
    resp = client.chat.completions.create(model="deepseek-chat", messages=CHAT["messages"], max_tokens=20, n=2)
    assert resp.object == "chat.completion" and len(resp.choices) == 2
    words = sum(len(c.message.content.split()) for c in resp.choices)
    assert resp.usage.completion_tokens == words
    assert resp.usage.prompt_tokens == (len(CHAT["messages"][0]["content"]) + 3) // 4   # ~4 chars a token
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    stream = client.chat.completions.create(model="deepseek-chat", messages=CHAT["messages"], max_tokens=30,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    models = [m.id for m in client.models.list()]
    assert models == ["deepseek-chat", "deepseek-reasoner"]
    c = counters(mock)
    assert c["requests"] == {"200": 3}
    assert c["streams_started"] == 1 and c["streams_completed"] == 1
    assert c["tokens"]["output"] == words + len(text)


def test_sdk_async_streams_reasoning_then_content(start_mock):
    mock = start_mock("--ttft-ms", "5", "--itl-ms", "1", "--output-tokens-spread", "0")

    async def run():
        client = openai.AsyncOpenAI(base_url=mock.api, api_key="unused", max_retries=0, timeout=10)
        stream = await client.chat.completions.create(model="deepseek-reasoner", messages=CHAT["messages"],
                                                      max_tokens=10, stream=True,
                                                      stream_options={"include_usage": True})
        kinds = []
        usage = None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                d = ch.delta.model_dump()
                if d.get("reasoning_content"):
                    kinds.append("r")
                elif d.get("content"):
                    kinds.append("c")
        whole = await client.chat.completions.create(model="deepseek-reasoner", messages=CHAT["messages"],
                                                     max_tokens=6)
        await client.close()
        return kinds, usage, whole

    kinds, usage, whole = asyncio.run(asyncio.wait_for(run(), 20))
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds   # all r before any c
    assert usage.completion_tokens == len(kinds) == 10
    assert usage.completion_tokens_details.reasoning_tokens == kinds.count("r")
    msg = whole.choices[0].message.model_dump()
    assert msg["reasoning_content"] and msg["content"] and whole.choices[0].finish_reason == "length"


def test_raw_sse_framing_and_ground_truth_headers(start_mock):
    mock = start_mock("--ttft-ms", "30", "--ttft-jitter-ms", "0", "--itl-ms", "2", "--tokens-per-chunk", "3",
                      "--output-tokens-spread", "0")
    req = urllib.request.Request(mock.api + "/chat/completions", method="POST",
                                 data=json.dumps({**CHAT, "stream": True, "max_tokens": 10}).encode(),
                                 headers={"Content-Type": "application/json"})
    parser, events = SSEParser(), []
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        hdrs = dict(resp.headers)
        while chunk := resp.read1(65536):
            events += parser.feed(chunk)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    texts = [p["choices"][0]["delta"].get("content") for p in payloads[1:-1]]
    assert [len(t.split()) for t in texts] == [3, 3, 3, 1]       # 10 tokens, 3 per chunk
    assert int(hdrs["x-mock-output-tokens"]) == 10
    assert float(hdrs["x-mock-ttft-ms"]) == pytest.approx(30.0 + float(hdrs["x-mock-queue-ms"]), abs=0.01)
    assert int(hdrs["x-mock-prompt-tokens"]) >= 1 and hdrs["x-mock-request-id"] == payloads[0]["id"]


def test_completions_endpoint_and_bad_requests(mock_server):
    status, _, body = http("POST", mock_server.api + "/completions",
                           {"model": "deepseek-chat", "prompt": "Once upon", "max_tokens": 4})
    assert status == 200 and body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == len(body["choices"][0]["text"].split()) <= 4
    bad = [
        b"{not json",
        b"[" * 100_000 + b"]" * 100_000,          # nesting deeper than the JSON parser recurses
        {"model": "deepseek-chat"},
        {"model": "deepseek-chat", "messages": "hi"},
        {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
        {"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}], "n": 0},
        {"model": "gpt-unknown", "messages": [{"role": "user", "content": "x"}]},
    ]
    for body in bad:
        status, hdrs, err = http("POST", mock_server.api + "/chat/completions", body)
        assert status == 400, body
        assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert err["error"]["code"] == "model_not_found"
    assert http("GET", mock_server.url + "/nowhere")[0] == 404
    assert http("GET", mock_server.api + "/chat/completions")[0] == 405
    c = counters(mock_server)
    assert c["requests"] == {"200": 1, "400": 7, "404": 1, "405": 1}
    assert c["by_path"] == {"/v1/chat/completions": 8, "/v1/completions": 1, "other": 1}


def test_http10_stream_ends_with_the_connection(mock_server):
    import socket
    host, port = mock_server.url.removeprefix("http://").split(":")
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 3}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    events = SSEParser().feed(rest)
    assert events[-1] == "[DONE]" and len(events) == 1 + 3 + 1 + 1     # role, 3 tokens, finish, [DONE]


def test_sdk_completions_streamed_and_n(start_mock):
    mock = start_mock("--ttft-ms", "2", "--itl-ms", "1", "--tokens-per-chunk", "2", "--output-tokens-spread", "0")
    client = openai.OpenAI(base_url=mock.api, api_key="unused", max_retries=0, timeout=10)
    chunks = list(client.completions.create(model="deepseek-chat", prompt="Once upon a time", max_tokens=5,
                                            n=2, stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert all(len(t.split()) == 5 for t in texts.values())     # max_tokens caps each choice
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["length", "length"]


def test_stop_sequence_ends_the_content_before_it(start_mock):
    mock = start_mock("--seed", "4", "--output-tokens-mean", "40", "--output-tokens-spread", "0", "--ttft-ms", "1",
                      "--itl-ms", "0")
    client = openai.OpenAI(base_url=mock.api, api_key="unused", max_retries=0, timeout=10)
    full = client.chat.completions.create(model="deepseek-chat", messages=CHAT["messages"]).choices[0]
    words = full.message.content.split()
    assert full.finish_reason == "stop" and len(words) == 40
    # The synthetic text cycles through 43 words, two of them "the": any 40 words hold a " the".
    stop = " the"
    resp = client.chat.completions.create(model="deepseek-chat", messages=CHAT["messages"], stop=[stop, "zzz"])
    content = resp.choices[0].message.content
    assert stop not in content and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == len(content.split()) < 40
    stream = client.chat.completions.create(model="deepseek-chat", messages=CHAT["messages"], stop=stop,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert stop not in streamed and chunks[-1].usage.completion_tokens == len(streamed.split())
