"""Injected faults, capacity queueing, seed reproducibility and exact counters of the mock."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.request

import openai
import pytest
from test_mock import CHAT, counters
from test_mock import http as call

from opskit.core.sse import SSEParser

pytestmark = pytest.mark.slow

FAST = ("--ttft-ms", "2", "--ttft-jitter-ms", "0", "--itl-ms", "1", "--itl-jitter-ms", "0")


def put(mock, section: str, body: object) -> tuple[int, dict]:
    status, _, out = call("PUT", f"{mock.admin_url}/admin/{section}", body)
    return status, out


def stream_events(url: str, body: dict) -> tuple[list[str], bool]:
    """SSE payloads of one streamed request, and whether the body ended cleanly."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    parser, events = SSEParser(), []
    with urllib.request.urlopen(req, timeout=10) as resp:
        try:
            while chunk := resp.read1(65536):
                events += parser.feed(chunk)
        except http.client.IncompleteRead:
            return events, False
    return events, True


def wait_until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_error_faults_from_flag_then_cleared_at_runtime(start_mock):
    mock = start_mock("--error-rate", "503=0.5,500=0.25", "--error-rate", "503=0.75", *FAST)   # the last wins
    client = openai.OpenAI(base_url=mock.api, api_key="x", max_retries=0, timeout=10)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(**CHAT)
    first = err.value.status_code
    assert first in (500, 503) and err.value.body["type"] == "server_error"
    assert call("GET", mock.admin_url + "/admin/faults")[2]["error_rate"] == {"500": 0.25, "503": 0.75}
    status, faults = put(mock, "faults", {"error_rate": {"503": 0, "500": 0.25, "502": 0.25}})
    assert status == 200 and faults["error_rate"] == {"500": 0.25, "502": 0.25}
    seen: dict[str, int] = {}
    for _ in range(60):
        code = str(call("POST", mock.api + "/chat/completions", {**CHAT, "max_tokens": 1})[0])
        seen[code] = seen.get(code, 0) + 1
    assert set(seen) == {"200", "500", "502"}
    seen[str(first)] = seen.get(str(first), 0) + 1
    assert counters(mock)["requests"] == seen   # client view == mock counters


def test_hang_holds_until_the_client_leaves(start_mock):
    mock = start_mock("--hang-rate", "1", *FAST)
    with pytest.raises((TimeoutError, socket.timeout, OSError)):
        call("POST", mock.api + "/chat/completions", CHAT, timeout=0.5)
    wait_until(lambda: counters(mock)["in_flight"] == 0)
    c = counters(mock)
    assert c["hangs"] == 1 and c["client_disconnects"] == 1 and c["requests"] == {}


def test_cut_stream_ends_without_done(start_mock):
    mock = start_mock("--cut-rate", "1", "--output-tokens-mean", "20", "--output-tokens-spread", "0", *FAST)
    events, clean = stream_events(mock.api + "/chat/completions", CHAT)
    assert not clean and "[DONE]" not in events
    texts = [json.loads(e)["choices"][0]["delta"].get("content") for e in events]
    assert texts[0] == "" and len(texts) == 1 + 10          # role chunk, then half of the 20 tokens
    c = counters(mock)
    assert c["streams_started"] == 1 and c["streams_cut"] == 1 and c["streams_completed"] == 0
    assert c["tokens"]["output"] == 10


def test_malformed_chunk_once_per_stream(start_mock):
    mock = start_mock("--malformed-rate", "1", *FAST)
    events, clean = stream_events(mock.api + "/chat/completions", {**CHAT, "max_tokens": 8})
    assert clean and events[-1] == "[DONE]"
    bad = []
    for e in events[:-1]:
        try:
            json.loads(e)
        except ValueError:
            bad.append(e)
    assert len(bad) == 1 and counters(mock)["malformed_chunks"] == 1


def test_extra_ttft_and_admin_validation(mock_server):
    status, latency = put(mock_server, "latency", {"ttft_jitter_ms": 0, "ttft_ms": 5})
    assert status == 200 and latency["ttft_ms"] == 5
    assert put(mock_server, "faults", {"extra_ttft_ms": 150})[0] == 200
    t0 = time.perf_counter()
    status, hdrs, _ = call("POST", mock_server.api + "/chat/completions", {**CHAT, "max_tokens": 1})
    elapsed = time.perf_counter() - t0
    assert status == 200 and float(hdrs["x-mock-ttft-ms"]) >= 155.0 and elapsed >= 0.155
    before = call("GET", mock_server.admin_url + "/admin/faults")[2]
    for bad in ({"hang_rate": 2}, {"error_rate": {"404": 0.1}}, {"bogus": 1}, [1], {"error_rate": {"500": 0.7,
                                                                                                   "502": 0.7}}):
        status, body = put(mock_server, "faults", bad)
        assert status == 400 and body["error"]["message"]
    assert put(mock_server, "latency", {"capacity": 0})[0] == 400
    assert put(mock_server, "limits", {"rpm": -1})[0] == 400
    status, _, body = call("PUT", mock_server.admin_url + "/admin/faults", b"{oops")
    assert status == 400
    assert call("GET", mock_server.admin_url + "/admin/faults")[2] == before


def test_capacity_queues_and_ground_truth_queue_time(start_mock):
    import concurrent.futures
    mock = start_mock("--capacity", "1", "--ttft-ms", "100", "--ttft-jitter-ms", "0", "--itl-ms", "0",
                      "--itl-jitter-ms", "0")
    body = {**CHAT, "max_tokens": 1}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(call, "POST", mock.api + "/chat/completions", body) for _ in range(3)]
        results = [f.result(timeout=10) for f in futs]
    queues = sorted(float(h["x-mock-queue-ms"]) for _, h, _ in results)
    ttfts = sorted(float(h["x-mock-ttft-ms"]) for _, h, _ in results)
    # One slot, 100 ms generations: the 2nd waits one generation, the 3rd two (upper bounds are loose:
    # they only guard against a broken gate, not the speed of a busy machine).
    # (arrivals may be a few ms apart, hence the margins)
    assert queues[0] < 50 and 50 < queues[1] < 1000 and queues[2] - queues[1] > 50
    assert ttfts == pytest.approx([q + 100 for q in queues], abs=0.01)


def test_same_seed_same_schedules(start_mock):
    flags = ("--ttft-ms", "3", "--ttft-jitter-ms", "2", "--itl-ms", "0.1", "--itl-jitter-ms", "0.05")

    def run(seed: str) -> tuple[list[float], list[tuple]]:
        mock = start_mock("--seed", seed, *flags)
        ttfts, rest = [], []
        for _ in range(5):
            _, h, body = call("POST", mock.api + "/chat/completions", CHAT)
            ttfts.append(float(h["x-mock-ttft-ms"]) - float(h["x-mock-queue-ms"]))   # the sampled part
            rest.append((h["x-mock-output-tokens"], body["choices"][0]["message"]["content"]))
        return ttfts, rest

    (ta, ra), (tb, rb), (tc, rc) = run("7"), run("7"), run("8")
    assert ta == pytest.approx(tb, abs=0.0021) and ra == rb      # headers carry 3 decimals each
    assert ra != rc and ta != pytest.approx(tc, abs=0.0021)


def test_client_disconnect_mid_stream_is_counted(start_mock):
    mock = start_mock("--ttft-ms", "1", "--itl-ms", "20", "--output-tokens-mean", "100")
    host, port = mock.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read1(100)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until(lambda: counters(mock)["in_flight"] == 0)
    c = counters(mock)
    assert c["client_disconnects"] == 1 and c["streams_started"] == 1 and c["streams_completed"] == 0


def test_lateness_histogram_counts_every_text_chunk(start_mock):
    mock = start_mock(*FAST)
    events, clean = stream_events(mock.api + "/chat/completions", {**CHAT, "max_tokens": 12})
    assert clean
    late = call("GET", mock.admin_url + "/admin/lateness")[2]
    assert late["chunks"] == sum(late["counts"]) == 12      # one observation per text chunk
    assert late["max_ms"] >= 0 and late["p99_le_ms"] is not None
    call("POST", mock.admin_url + "/admin/reset")
    assert call("GET", mock.admin_url + "/admin/lateness")[2]["chunks"] == 0
