"""The mock's WebSocket transport (`GET /v1/chat/stream`) with a real websocket-client."""

from __future__ import annotations

import json
import time

import pytest
import websocket
from test_mock import CHAT, counters, http

pytestmark = pytest.mark.slow

FAST = ("--ttft-ms", "1", "--ttft-jitter-ms", "0", "--itl-ms", "1", "--itl-jitter-ms", "0", "--output-tokens-spread", "0")


def connect(mock):
    return websocket.create_connection(mock.url.replace("http://", "ws://") + "/v1/chat/stream", timeout=10)


def until_end(ws) -> list[dict]:
    out = []
    while True:
        raw = ws.recv()
        if not raw:
            return out
        try:
            msg = json.loads(raw)
        except ValueError:
            out.append({"type": "invalid", "raw": raw})
            continue
        out.append(msg)
        if msg["type"] in ("done", "error"):
            return out


def test_ws_streams_the_same_chunks_and_serves_several_requests(start_mock):
    mock = start_mock(*FAST)
    ws = connect(mock)
    try:
        ws.send(json.dumps({"type": "auth"}))
        for max_tokens in (5, 3):
            body = {**CHAT, "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
            ws.send(json.dumps({"type": "request", "body": body}))
            msgs = until_end(ws)
            assert msgs[-1] == {"type": "done"}
            chunks = [m["data"] for m in msgs[:-1]]
            assert all(m["type"] == "chunk" for m in msgs[:-1])
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            text = [c["choices"][0]["delta"]["content"] for c in chunks[1:] if c["choices"]
                    and c["choices"][0]["delta"].get("content")]
            assert chunks[-1]["usage"]["completion_tokens"] == len(text) == max_tokens
            assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        ws.send(json.dumps({"type": "request", "body": {"model": "deepseek-chat"}}))
        err = until_end(ws)[-1]
        assert err["type"] == "error" and err["status"] == 400
        ws.send("not json")
        assert until_end(ws)[-1]["error"]["code"] == "invalid_message"
    finally:
        ws.close()
    c = counters(mock)
    assert c["requests"] == {"101": 1} and c["ws"] == {"200": 2, "400": 2}
    assert c["streams_completed"] == 2 and c["tokens"]["output"] == 8


def test_ws_rate_limit_and_cut(start_mock):
    mock = start_mock("--rpm", "1", *FAST)
    ws = connect(mock)
    try:
        for _ in range(2):
            ws.send(json.dumps({"type": "request", "body": {**CHAT, "max_tokens": 2}}))
            last = until_end(ws)[-1]
        assert last["type"] == "error" and last["status"] == 429 and last["error"]["code"] == "rate_limit_exceeded"
    finally:
        ws.close()
    http("PUT", mock.admin_url + "/admin/limits", {"rpm": None})
    http("PUT", mock.admin_url + "/admin/faults", {"cut_rate": 1.0})
    ws = connect(mock)
    try:
        ws.send(json.dumps({"type": "request", "body": {**CHAT, "max_tokens": 6}}))
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            msgs = until_end(ws)
            if not msgs or msgs[-1]["type"] != "done":   # a closed socket may also read as b""
                raise ConnectionError("closed without done")
    finally:
        ws.close()
    assert counters(mock)["streams_cut"] == 1


def test_plain_get_on_ws_path_is_a_counted_400(mock_server):
    status, _, body = http("GET", mock_server.api + "/chat/stream")
    assert status == 400 and body["error"]["code"] == "upgrade_required"
    assert counters(mock_server)["requests"] == {"400": 1}


def test_ws_malformed_chunk_and_hang(start_mock):
    mock = start_mock("--malformed-rate", "1", *FAST)
    ws = connect(mock)
    try:
        ws.send(json.dumps({"type": "request", "body": {**CHAT, "max_tokens": 6}}))
        msgs = until_end(ws)
    finally:
        ws.close()
    assert msgs[-1] == {"type": "done"} and [m["type"] for m in msgs].count("invalid") == 1
    http("PUT", mock.admin_url + "/admin/faults", {"malformed_rate": 0, "hang_rate": 1})
    ws = connect(mock)
    ws.settimeout(0.5)
    try:
        ws.send(json.dumps({"type": "request", "body": CHAT}))
        with pytest.raises(websocket.WebSocketTimeoutException):
            ws.recv()
    finally:
        ws.shutdown()    # a hung server never answers a close frame: just drop the connection
    deadline = time.monotonic() + 5
    while counters(mock)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    c = counters(mock)
    assert c["hangs"] == 1 and c["in_flight"] == 0 and c["malformed_chunks"] == 1
