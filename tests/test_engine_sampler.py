"""The load test's engine sampler against real local servers: a mock playing vLLM under load, a mock
whose /metrics is down, a closed port, and a server speaking no engine's names (one counted reason
each, never an exception)."""

from __future__ import annotations

import asyncio
import http.server
import threading
import urllib.request

import aiohttp
import pytest

from opskit.core.processes import free_port
from opskit.loadtest.engine_sampler import EngineSampler, parse

pytestmark = pytest.mark.slow


async def _load(url: str, n: int) -> None:
    body = {"model": "deepseek-chat", "max_tokens": 20, "stream": False,
            "messages": [{"role": "user", "content": "How deep is the queue today?"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async def one():
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.read()
        await asyncio.gather(*(one() for _ in range(n)))


def test_samples_queue_kv_and_server_side_means_from_a_loaded_engine(start_mock):
    mock = start_mock("--engine", "vllm", "--capacity", "2", "--ttft-ms", "40", "--ttft-jitter-ms", "0",
                      "--itl-ms", "5", "--itl-jitter-ms", "0")
    sampler = EngineSampler(mock.url + "/metrics", interval_s=0.02)
    sampler.start()
    asyncio.run(_load(mock.url, 8))
    sampler.stop()
    s = sampler.summary()
    assert s["engine"] == "vllm" and s["errors"] == {} and s["samples"] >= 2
    assert s["max_running"] == 2 and s["max_waiting"] >= 1 and 0 < s["max_kv_usage"] <= 1
    # 8 calls on 2 slots: every one waited for its turn or not, each took its 40 ms to the first token.
    assert s["server_ttft_mean_s"] >= 0.04 and s["queue_time_mean_s"] > 0 and s["preemptions"] == 0
    rows = sampler.series()
    assert rows[0]["t_s"] == 0 and all(r["kv_usage"] is not None for r in rows)
    assert sampler.notes() == []


class _Other(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = b"# TYPE node_load1 gauge\nnode_load1 0.5\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_bad_endpoints_are_counted_with_one_line_each(start_mock):
    mock = start_mock("--engine", "tgi")
    req = urllib.request.Request(mock.admin_url + "/admin/engine", data=b'{"metrics_up": false}', method="PUT")
    urllib.request.urlopen(req, timeout=5).close()
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        cases = {mock.url + "/metrics": "HTTP 503", f"http://127.0.0.1:{free_port()}/metrics": "unreachable",
                 f"http://127.0.0.1:{other.server_address[1]}/metrics": "no vLLM, SGLang or TGI series"}
        for url, reason in cases.items():
            sampler = EngineSampler(url, timeout_s=2)
            sampler.sample()
            sampler.sample()
            s = sampler.summary()
            assert s["engine"] is None and s["samples"] == 0
            (got,) = s["errors"].items()
            assert got[0].startswith(reason) and got[1] == 2, got
            (line,) = sampler.notes()
            assert url in line and "2 sample(s) failed" in line
    finally:
        other.shutdown()
        other.server_close()


def test_tgi_has_no_kv_usage_and_garbage_is_one_reason():
    tgi = "# TYPE tgi_queue_size gauge\ntgi_queue_size 3\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 2\n"
    assert parse(tgi).engine == "tgi"
    sampler = EngineSampler("http://127.0.0.1:1/metrics")
    sampler.snapshots.append(parse(tgi))
    assert sampler.series()[0] == {"t_s": 0, "waiting": 3, "running": 2, "kv_usage": None}
    assert sampler.summary()["max_kv_usage"] is None and sampler.summary()["preemptions"] is None
    with pytest.raises(Exception, match="not Prometheus text"):
        parse("this is {not metrics\n")
