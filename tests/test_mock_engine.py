"""`opskit mock --engine`: the engine's /metrics (parsed with prometheus_client's parser, checked
against the engine catalogue) moving with real load on a real mock, KV cache and preemption, prefix
cache, admin knobs, and the engine endpoints."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from opskit.core import engine_catalog as ec

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
PROMPT = "Summarise the operators' notes on queue depth, KV cache usage and preemption for today."


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _admin(mock, method: str, path: str, body: object = None) -> tuple[int, dict]:
    req = urllib.request.Request(mock.admin_url + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def scrape(mock) -> dict[str, dict]:
    """Family name -> {"type", "samples": {(sample name, sorted labels): value}} of GET /metrics."""
    status, body = _get(mock.url + "/metrics")
    assert status == 200, body
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        out[fam.name] = {"type": fam.type, "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value
                                                       for s in fam.samples}}
    return out


def value(metrics: dict, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    fam = next(f for f in metrics.values() if any(k[0] == name for k in f["samples"]))
    return sum(v for (n, lbl), v in fam["samples"].items() if n == name and set(labels.items()) <= set(lbl))


def check_against_catalogue(metrics: dict, engine: str) -> None:
    """Every catalogued family is there with its type, labels and exact bucket edges; no other."""
    families = ec.BY_ENGINE[engine]
    assert set(metrics) == {m.name.removesuffix("_total") if m.type == "counter" else m.name for m in families}
    for m in families:
        fam = metrics[m.name.removesuffix("_total") if m.type == "counter" else m.name]
        assert fam["type"] == m.type, m.name
        for _sample, labels in fam["samples"]:
            assert {k for k, _ in labels} - {"le"} == set(m.labels), (m.name, labels)
        if m.type == "histogram":
            edges = [float(dict(lbl)["le"]) for (n, lbl) in fam["samples"] if n.endswith("_bucket")]
            assert edges == [*m.buckets, float("inf")], m.name


async def _chat(session: aiohttp.ClientSession, url: str, max_tokens: int, prompt: str = PROMPT,
                stream: bool = True) -> dict:
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    async with session.post(url + CHAT, json=body) as r:
        assert r.status == 200
        if not stream:
            return (await r.json())["usage"]
        usage = None
        async for line in r.content:
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = json.loads(line[6:])["usage"]
        return usage


async def _load_and_watch(mock, n: int, max_tokens: int, until, prompt: str = PROMPT, timeout: float = 30.0):
    """Send n streamed calls at once; poll /metrics (in a thread) until `until(metrics)` holds or all
    calls end. Returns (usages, the metrics that satisfied `until` or None)."""
    seen = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        calls = asyncio.gather(*(_chat(s, mock.url, max_tokens, prompt) for _ in range(n)))
        task = asyncio.ensure_future(calls)
        while not task.done() and seen is None:
            m = await asyncio.to_thread(scrape, mock)
            if until(m):
                seen = m
            await asyncio.sleep(0.02)
        return await task, seen


def test_vllm_metrics_follow_the_queue_and_every_finished_request(start_mock):
    mock = start_mock("--engine", "vllm", "--capacity", "2", "--ttft-ms", "30", "--ttft-jitter-ms", "0",
                      "--itl-ms", "15", "--itl-jitter-ms", "0", "--seed", "1")
    idle = scrape(mock)
    check_against_catalogue(idle, ec.VLLM)
    assert value(idle, "vllm:num_requests_running") == 0 and value(idle, "vllm:kv_cache_usage_perc") == 0

    def busy(m):
        return value(m, "vllm:num_requests_running") == 2 and value(m, "vllm:num_requests_waiting") >= 1

    usages, during = asyncio.run(_load_and_watch(mock, 6, 20, busy))
    assert during is not None, "never saw 2 running and a queue while 6 calls shared 2 slots"
    assert value(during, "vllm:kv_cache_usage_perc") > 0

    after = scrape(mock)
    check_against_catalogue(after, ec.VLLM)
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0
    finished = {r: value(after, "vllm:request_success_total", finished_reason=r) for r in ec.VLLM_FINISH_REASONS}
    assert sum(finished.values()) == 6 and finished["abort"] == 0
    assert value(after, "vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    gen = sum(u["completion_tokens"] for u in usages)
    assert value(after, "vllm:generation_tokens_total") == gen
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert value(after, f"vllm:{name}_count") == 6, name
    assert value(after, "vllm:inter_token_latency_seconds_count") == gen - 6
    # Queueing happened: 6 calls on 2 slots wait about two answers' time in total or more.
    assert value(after, "vllm:request_queue_time_seconds_sum") > 0
    # Server-side TTFT includes the queue: it is at least the sampled 30 ms for every call.
    assert value(after, "vllm:time_to_first_token_seconds_sum") >= 6 * 0.03
    assert value(after, "vllm:time_to_first_token_seconds_bucket", le="0.02") == 0


def test_a_small_kv_cache_fills_preempts_and_every_stream_still_completes(start_mock):
    # 4 calls of ~22 prompt tokens growing to 80 tokens each need ~400 tokens; the cache holds 200.
    mock = start_mock("--engine", "vllm", "--capacity", "8", "--kv-capacity-tokens", "200", "--ttft-ms", "5",
                      "--itl-ms", "8", "--itl-jitter-ms", "0", "--output-tokens-spread", "0",
                      "--output-tokens-mean", "80")

    def preempting(m):
        return value(m, "vllm:num_preemptions_total") >= 1 and value(m, "vllm:num_requests_waiting") >= 1

    usages, during = asyncio.run(_load_and_watch(mock, 4, 80, preempting))
    assert during is not None, "no preemption seen while 4 streams outgrew a 200-token KV cache"
    assert value(during, "vllm:kv_cache_usage_perc") > 0.5
    assert [u["completion_tokens"] for u in usages] == [80] * 4   # preempted streams resume and finish
    after = scrape(mock)
    assert value(after, "vllm:request_success_total", finished_reason="length") == 4
    assert value(after, "vllm:num_preemptions_total") >= 1
    assert value(after, "vllm:kv_cache_usage_perc") == 0
    state = _admin(mock, "GET", "/admin/engine")[1]
    assert state["preemptions"] == value(after, "vllm:num_preemptions_total") and state["running"] == 0


def test_admin_shrinks_the_kv_cache_at_run_time_and_refuses_bad_values(start_mock):
    mock = start_mock("--engine", "sglang", "--ttft-ms", "5", "--itl-ms", "10", "--itl-jitter-ms", "0",
                      "--output-tokens-mean", "100", "--output-tokens-spread", "0")
    assert _admin(mock, "PUT", "/admin/engine", {"kv_capacity_tokens": 0})[0] == 400
    assert _admin(mock, "PUT", "/admin/engine", {"kv_capacity_tokens": 30, "capacity": "many"})[0] == 400
    assert _admin(mock, "PUT", "/admin/engine", {"kv_blocks": 3})[0] == 400
    state = _admin(mock, "GET", "/admin/engine")[1]
    assert state["kv_capacity_tokens"] == 1 << 20 and state["capacity"] == 256   # nothing changed

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            calls = asyncio.ensure_future(asyncio.gather(*(_chat(s, mock.url, 100) for _ in range(3))))
            deadline = time.monotonic() + 10
            while value(await asyncio.to_thread(scrape, mock), "sglang:num_running_reqs") < 3:
                assert time.monotonic() < deadline, "3 calls never ran together"
                await asyncio.sleep(0.02)
            status, body = await asyncio.to_thread(_admin, mock, "PUT", "/admin/engine",
                                                   {"kv_capacity_tokens": 60, "capacity": 3})
            assert status == 200 and body["kv_capacity_tokens"] == 60 and body["capacity"] == 3
            shrunk = await asyncio.to_thread(scrape, mock)
            return await calls, shrunk

    usages, shrunk = asyncio.run(run())
    check_against_catalogue(shrunk, ec.SGLANG)
    assert value(shrunk, "sglang:num_retracted_requests_total") >= 1
    assert value(shrunk, "sglang:max_total_num_tokens") == 60
    assert value(shrunk, "sglang:num_queue_reqs") >= 1
    assert [u["completion_tokens"] for u in usages] == [100] * 3
    after = scrape(mock)
    assert value(after, "sglang:num_requests_total") == 3 and value(after, "sglang:num_aborted_requests_total") == 0
    assert value(after, "sglang:generation_tokens_total") == 300
    assert value(after, "sglang:num_retractions_sum") == value(after, "sglang:num_retracted_requests_total")


def test_a_repeated_prompt_hits_the_prefix_cache(start_mock):
    mock = start_mock("--engine", "vllm", "--ttft-ms", "1", "--itl-ms", "1")
    long_prompt = "You are a careful assistant for the operations team. " * 20   # ~1,000 characters

    async def run():
        async with aiohttp.ClientSession() as s:
            first = await _chat(s, mock.url, 4, long_prompt, stream=False)
            await _chat(s, mock.url, 4, long_prompt + " And one more question.", stream=False)
            return first

    usage = asyncio.run(run())
    m = scrape(mock)
    queries, hits = value(m, "vllm:prefix_cache_queries_total"), value(m, "vllm:prefix_cache_hits_total")
    assert queries >= 2 * usage["prompt_tokens"]
    # The second prompt starts with the whole first one: all its full 16-token blocks hit.
    assert usage["prompt_tokens"] - 16 <= hits <= usage["prompt_tokens"]


def test_tgi_metrics_and_cut_streams_count_as_aborts(start_mock):
    mock = start_mock("--engine", "tgi", "--cut-rate", "1", "--ttft-ms", "1", "--itl-ms", "1")

    async def run():
        async with aiohttp.ClientSession() as s:
            body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                    "max_tokens": 10}
            for _ in range(2):
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with s.post(mock.url + CHAT, json=body) as r:
                        await r.read()
            return await _chat(s, mock.url, 10, stream=False)   # not a stream: never cut

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while value(m := scrape(mock), "tgi_request_count_total") < 3:   # the cut streams' handlers may lag
        assert time.monotonic() < deadline
        time.sleep(0.05)
    check_against_catalogue(m, ec.TGI)
    assert value(m, "tgi_request_success_total") == 1
    assert value(m, "tgi_request_generated_tokens_count") == 3
    assert value(m, "tgi_queue_size") == 0 and value(m, "tgi_batch_current_size") == 0
    raw = _get(mock.url + "/metrics")[1].decode()
    assert "tgi_request_count 3\n" in raw and "# TYPE tgi_request_count counter" in raw   # no _total
    assert 'tgi_request_generated_tokens_bucket{le="' in raw and not re.search(r'le="\d+\.0"', raw)  # Rust floats


@pytest.mark.parametrize("engine,paths", [
    ("vllm", {"/ping": b"", "/version": {"version": ec.VERSIONS["vllm"]}, "/load": {"server_load": 0}}),
    ("sglang", {"/health_generate": b"", "/get_model_info": {"model_path": "deepseek-chat",
                                                             "tokenizer_path": "deepseek-chat", "is_generation": True}}),
    ("tgi", {"/info": None}),
])
def test_engine_endpoints_health_and_metrics_down(start_mock, engine, paths):
    mock = start_mock("--engine", engine)
    assert _get(mock.url + "/health") == (200, b"")
    for path, want in paths.items():
        status, body = _get(mock.url + path)
        assert status == 200, path
        if isinstance(want, dict):
            assert json.loads(body) == want
        elif want is None:
            info = json.loads(body)
            assert info["model_id"] == "deepseek-chat" and info["max_total_tokens"] == ec.TGI_MAX_TOTAL_TOKENS
        else:
            assert body == want
    assert _admin(mock, "PUT", "/admin/engine", {"metrics_up": False})[0] == 200
    assert _get(mock.url + "/metrics")[0] == 503
    assert _admin(mock, "PUT", "/admin/engine", {"metrics_up": "no"})[0] == 400
    assert _admin(mock, "PUT", "/admin/engine", {"metrics_up": True})[0] == 200
    assert _get(mock.url + "/metrics")[0] == 200
    counters = _admin(mock, "GET", "/admin/counters")[1]
    assert counters["requests"] == {} and counters["introspection"]["/metrics"] == 2
    assert counters["introspection"]["/health"] == 1


def test_plain_mock_answers_health_but_has_no_engine(start_mock):
    mock = start_mock()
    assert _get(mock.url + "/health") == (200, b"")
    assert _get(mock.url + "/metrics")[0] == 404
    assert _get(mock.url + "/version")[0] == 404
    status, body = _admin(mock, "PUT", "/admin/engine", {"kv_capacity_tokens": 10})
    assert status == 400 and "--engine" in body["error"]["message"]
    assert _admin(mock, "GET", "/admin/engine")[1] == {"engine": None, "capacity": 256, "metrics_up": True}


def test_engine_bucket_formulas():
    assert ec.one_two_five(100) == (1, 2, 5, 10, 20, 50, 100)
    assert ec.one_two_five(ec.MAX_MODEL_LEN)[-1] == 5000
    t = ec.tgi_duration_buckets()
    assert len(t) == 35 and t[0] == pytest.approx(0.00015) and t[1] / t[0] == pytest.approx(1.5)
    assert ec.tgi_length_buckets(4096)[-1] == 4096 and len(ec.tgi_length_buckets(4096)) == 100
