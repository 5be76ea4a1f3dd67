"""OpenMetrics exposition with exemplars: the latency buckets carry a recent call's request id, served
only when the scraper asks for OpenMetrics; the plain text format is unchanged."""

from __future__ import annotations

import urllib.request

import prometheus_client
import pytest
from prometheus_client import Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families

from opskit.core import config
from opskit.core.records import CallRecord
from opskit.sidecar import exporter_server
from opskit.sidecar.fast_exposition import Renderer
from tests.test_exporter import SECRET, base_env, promtool_check, sample, start_exporter  # noqa: F401

OM_ACCEPT = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75," \
            "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"  # what Prometheus 2.42 sends


def _registry(monkeypatch):
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", False)  # as the exporter runs
    cfg = config.parse({"targets": [{"name": "t", "base_url": "http://h/v1", "models": ["m"],
                                     "daily_quota_requests": 7}]}, env={})
    reg, calls = exporter_server.build_registry(cfg)
    return reg, calls


def _exemplars(text: str, family: str) -> dict[str, str]:
    """le (prefixed with stream= where the family has it) -> exemplar request_id of one histogram
    family, from the OpenMetrics parser."""
    out = {}
    for fam in om_families(text):
        if fam.name == family:
            for s in fam.samples:
                if s.name.endswith("_bucket") and s.exemplar is not None:
                    stream = f"stream={s.labels['stream']} " if "stream" in s.labels else ""
                    out[stream + s.labels["le"]] = s.exemplar.labels["request_id"]
    return out


def test_openmetrics_render_equals_the_library_and_carries_request_ids(monkeypatch):
    reg, calls = _registry(monkeypatch)
    calls.observe(CallRecord("t", "proxy", "m", 200, "", 0.3, ttft_s=0.05, output_tokens=20, streamed=True,
                             request_id="req-slow-1"))
    calls.observe(CallRecord("t", "proxy", "m", 200, "", 0.3, ttft_s=0.05, output_tokens=20, streamed=True,
                             request_id="req-slow-2"))  # the most recent call in a bucket is its exemplar
    calls.observe(CallRecord("t", "proxy", "m", 200, "", 40.0, request_id='odd "id"\\ é'))
    calls.observe(CallRecord("t", "proxy", "m", 429, "rate_limited", 0.01, request_id="req-429"))
    calls.observe(CallRecord("t", "probe", "m", 200, "", 0.02))  # no request id: no exemplar
    odd = Gauge("odd_values", 'help with \\ and "quotes"\nand a newline', ["a"], registry=reg)
    odd.labels('quote" back\\slash\nnewline').set(float("nan"))
    Counter("plain_events_total", "no labels", registry=reg).inc(3)
    Histogram("empty_hist", "no children yet", ["k"], registry=reg)
    r = Renderer(reg)
    for _ in range(2):  # the second render uses the cached prefixes
        om = r.render(openmetrics=True)
        assert om == om_generate_latest(reg)
        assert r.render() == generate_latest(reg)  # plain: unchanged, no exemplar
    text = om.decode()
    assert text.endswith("# EOF\n") and b"request_id" not in r.render()
    duration = _exemplars(text, "opskit_llm_request_duration_seconds")
    assert duration == {"stream=true 0.5": "req-slow-2", "stream=false 60.0": 'odd "id"\\ é'}  # 429 and probe: none
    assert _exemplars(text, "opskit_llm_time_to_first_token_seconds") == {"0.06": "req-slow-2"}
    assert _exemplars(text, "opskit_llm_time_per_output_token_seconds") == {"0.015": "req-slow-2"}  # (0.3 - 0.05) / 19
    promtool_check(r.render().decode())
    calls.observe(CallRecord("t", "proxy", "m", 200, "", 0.4, ttft_s=0.05, output_tokens=20, streamed=True,
                             request_id="req-newer"))  # a newer call in a bucket already rendered
    om = r.render(openmetrics=True)
    assert om == om_generate_latest(reg)
    assert _exemplars(om.decode(), "opskit_llm_request_duration_seconds")["stream=true 0.5"] == "req-newer"


def test_a_long_request_id_is_cut_to_fit_an_exemplar(monkeypatch):
    reg, calls = _registry(monkeypatch)
    calls.observe(CallRecord("t", "proxy", "m", 200, "", 0.3, request_id="x" * 500))
    ids = _exemplars(Renderer(reg).render(openmetrics=True).decode(), "opskit_llm_request_duration_seconds")
    assert ids == {"stream=false 0.5": "x" * 100}


@pytest.mark.slow
def test_exporter_serves_openmetrics_only_when_asked(start_exporter, mock_server):  # noqa: F811
    openai = pytest.importorskip("openai")
    ex = start_exporter("--no-gpu", "--proxy-listen", "127.0.0.1:0", "--upstream", mock_server.url, env=base_env())
    client = openai.OpenAI(base_url=ex.info["proxy_url"] + "/v1", api_key=SECRET, timeout=20, max_retries=0)
    reply = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)
    stream = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, stream=True)
    chunk_ids = {c.id for c in stream}
    req = urllib.request.Request(ex.info["url"] + "/metrics", headers={"Accept": OM_ACCEPT})
    with urllib.request.urlopen(req, timeout=10) as resp:
        ctype, om = resp.headers["Content-Type"], resp.read().decode()
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    ids = set(_exemplars(om, "opskit_llm_request_duration_seconds").values())
    assert ids == {reply.id} | chunk_ids and len(ids) == 2
    assert set(_exemplars(om, "opskit_llm_time_to_first_token_seconds").values()) == chunk_ids
    status, ctype, plain = ex.get("/metrics")
    assert ctype.startswith("text/plain; version=0.0.4") and " # {" not in plain and SECRET not in om + plain
    assert sample(plain, "opskit_llm_requests_total", target="default", code="200") == 2
    promtool_check(plain)
    assert ex.stop()[0] == 0


@pytest.mark.slow
def test_real_prometheus_stores_the_request_ids(start_exporter, mock_server, tmp_path):  # noqa: F811
    """Prometheus (exemplar storage on) negotiates OpenMetrics and keeps each bucket's request id."""
    import json
    import subprocess
    import time
    import urllib.parse

    import yaml

    from opskit.core.processes import free_port
    from tests.conftest import need_binary, stop

    openai = pytest.importorskip("openai")
    binary = need_binary("prometheus")
    ex = start_exporter("--no-gpu", "--proxy-listen", "127.0.0.1:0", "--upstream", mock_server.url,
                        "--metrics-linger-s", "0", env=base_env())
    client = openai.OpenAI(base_url=ex.info["proxy_url"] + "/v1", api_key=SECRET, timeout=20, max_retries=0)
    ids = {client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4).id for _ in range(3)}
    cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
           "scrape_configs": [{"job_name": "opskit", "static_configs": [
               {"targets": [ex.info["url"].removeprefix("http://")]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--enable-feature=exemplar-storage", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        found: set[str] = set()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            now = time.time()
            query = urllib.parse.urlencode({"query": "opskit_llm_request_duration_seconds_bucket",
                                            "start": now - 600, "end": now + 60})
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query_exemplars?{query}",
                                            timeout=5) as r:
                    body = json.loads(r.read())
                found = {e["labels"]["request_id"] for s in body["data"] for e in s["exemplars"]}
            except OSError:
                pass
            if found:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-1000:]
            time.sleep(0.5)
        # the calls are fast, so they share a bucket: the last one is its exemplar
        assert found and found <= ids, (found, ids)
    finally:
        stop(proc)
        ex.stop()


def test_openmetrics_page_with_gpu_series_parses(fake_nvml, tmp_path, monkeypatch):
    """The whole page Prometheus now gets (GPU health series included) is valid OpenMetrics."""
    from opskit.live.fakenvml import fake_gpus, write_state
    from opskit.sidecar.gpu import GpuCollector

    monkeypatch.setattr(prometheus_client.metrics, "_use_created", False)
    monkeypatch.setenv("FAKE_NVML_STATE", str(write_state(tmp_path / "s", fake_gpus(
        2, util=42, ecc_volatile=1, ecc_aggregate=2, remapped_correctable=1, clocks_event_reasons=0x24))))
    gpu = GpuCollector(lib_path=str(fake_nvml))
    try:
        cfg = config.parse({"targets": [{"name": "t", "base_url": "http://h/v1", "models": ["m"]}]}, env={})
        reg, calls = exporter_server.build_registry(cfg, gpu)
        calls.observe(CallRecord("t", "proxy", "m", 200, "", 0.3, ttft_s=0.05, output_tokens=20, streamed=True,
                                 input_tokens=5, request_id="req-1"))
        text = Renderer(reg).render(openmetrics=True).decode()
        families = {f.name: f for f in om_families(text)}  # raises on anything invalid
        assert families["opskit_gpu_utilization_ratio"].samples[0].value == pytest.approx(0.42)
        assert families["opskit_llm_requests"].type == "counter"
        assert _exemplars(text, "opskit_llm_time_to_first_token_seconds") == {"0.06": "req-1"}
    finally:
        gpu.close()
