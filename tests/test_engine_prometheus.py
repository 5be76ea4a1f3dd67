"""The engine rules and the "LLM engine" dashboard against a real Prometheus scraping three real
mocks (`--engine vllm`, `sglang`, `tgi`) on loopback: every engine:* recording and every engine-side
panel query returns data once load has run, and the engine's metrics going away shows as `up 0`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.parse
import urllib.request

import aiohttp
import pytest
import yaml

from opskit.core import thresholds
from opskit.core.processes import free_port
from opskit.opscode import dashboards as builder
from opskit.opscode import engine_rules, rules_file
from opskit.opscode.promql import series_names
from tests.conftest import need_binary, stop

pytestmark = pytest.mark.slow
JOB = "llm-engine"


def _query(prom: str, expr: str) -> list:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    """Factory: prometheus(targets) -> URL of a Prometheus scraping them every second (job llm-engine),
    with the project's rules loaded; stopped at teardown."""
    procs = []

    def start(targets: list[str]) -> str:
        binary = need_binary("prometheus")
        rules = tmp_path / "opskit.rules.yml"
        rules.write_text(rules_file.render_rules(thresholds.Thresholds(), eval_interval="1s"))
        cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
               "rule_files": [str(rules)],
               "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        port = free_port()
        proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if len([r for r in _query(url, f'up{{job="{JOB}"}}') if r["value"][1] == "1"]) == len(targets):
                    return url
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not scrape the mocks: {proc.stderr.read().decode()[-1000:]}")
            time.sleep(0.2)

    yield start
    for p in procs:
        stop(p)


async def _traffic(urls: list[str], n: int) -> None:
    body = {"model": "deepseek-chat", "max_tokens": 40, "stream": True,
            "messages": [{"role": "user", "content": "A shared system prompt for every call of this test. " * 4}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def one(url):
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.read()
        await asyncio.gather(*(one(u) for u in urls for _ in range(n)))


def _engine_queries() -> list[tuple[str, str]]:
    """(panel, query) of the LLM engine dashboard, client-side (opskit_*) queries left out: no exporter here."""
    return [(panel, expr) for board, panel, expr in builder.all_queries(thresholds.Thresholds())
            if board == "LLM engine" and not any(n.startswith("opskit_") for n in series_names(expr))]


def test_engine_recordings_and_panels_have_data_from_all_three_engines(start_mock, prometheus):
    flags = ("--capacity", "4", "--kv-capacity-tokens", "400", "--ttft-ms", "5", "--itl-ms", "5",
             "--output-tokens-mean", "40", "--output-tokens-spread", "0")
    mocks = {e: start_mock("--engine", e, *flags) for e in ("vllm", "sglang", "tgi")}
    prom = prometheus([m.url.removeprefix("http://") for m in mocks.values()])
    asyncio.run(_traffic([m.url for m in mocks.values()], 12))   # 12 on 4 slots, ~70 tokens each on 400

    want = {record for record, _ in engine_rules.recordings()}
    instances = {m.url.removeprefix("http://"): e for e, m in mocks.items()}

    def engines(expr: str) -> set[str]:
        return {instances[r["metric"]["instance"]] for r in _query(prom, expr)}

    def gaps() -> list[str]:
        out = [r for r in want if not _query(prom, r)]
        out += [f"{panel}: {expr}" for panel, expr in _engine_queries() if not _query(prom, expr)]
        # Each engine is in the unified series under its own instance; what TGI lacks stays absent.
        for record, has in ((engine_rules.WAITING, set(mocks)), (engine_rules.QUEUE_P95, set(mocks)),
                            (engine_rules.KV_USAGE, {"vllm", "sglang"})):
            if (got := engines(record)) != has:
                out.append(f"{record} has {sorted(got)}, expected {sorted(has)}")
        return out

    missing: list[str] = []
    deadline = time.monotonic() + 60   # a scrape that times out on a loaded machine makes a gap for a while
    while time.monotonic() < deadline and (missing := gaps()):
        time.sleep(0.5)
    assert not missing, f"no data for {missing}"


def test_engine_metrics_going_away_shows_as_up_0(start_mock, prometheus):
    mock = start_mock("--engine", "vllm")
    prom = prometheus([mock.url.removeprefix("http://")])
    req = urllib.request.Request(mock.admin_url + "/admin/engine", data=b'{"metrics_up": false}', method="PUT")
    urllib.request.urlopen(req, timeout=5).close()
    down = f'up{{job=~"{engine_rules.DEFAULT_ENGINE_JOB}"}} == 0'   # LLMEngineDown's expression
    deadline = time.monotonic() + 20
    while not _query(prom, down):
        assert time.monotonic() < deadline, "up never went to 0 after /metrics went away"
        time.sleep(0.2)
