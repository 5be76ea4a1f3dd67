"""The exporter: registry building in-process, the CLI's errors with CliRunner, and the real
`opskit exporter` process over HTTP (no NVML, fake NVML, metering proxy in front of the mock)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from opskit import __version__
from opskit.cli import main
from opskit.core import catalog, config
from opskit.core.records import CallRecord
from opskit.live.fakenvml import NOT_SUPPORTED, fake_gpus, uuid_for, write_state
from opskit.sidecar import exporter, exporter_server
from opskit.sidecar.gpu import GpuCollector
from tests.conftest import ROOT, need_binary, stop, wait_for_file

SECRET = "sk-test-must-never-appear-0123456789"


# ---------------------------------------------------------------------------------------- in-process

def test_build_registry_is_fresh_and_from_the_catalogue():
    cfg = config.parse({"targets": [
        {"name": "ds", "base_url": "https://api.deepseek.com", "models": ["deepseek-chat"],
         "daily_quota_requests": 5000},
        {"name": "gpu", "base_url": "http://vllm:8000/v1"},
    ]}, env={})
    reg1, calls1 = exporter_server.build_registry(cfg)
    reg2, _ = exporter_server.build_registry(cfg)          # a second one does not clash: no global state
    assert reg1.get_sample_value("opskit_build_info", {"version": __version__}) == 1
    assert reg1.get_sample_value("opskit_llm_quota_limit_requests", {"target": "ds"}) == 5000
    assert reg1.get_sample_value("opskit_llm_quota_limit_requests", {"target": "gpu"}) is None
    calls1.observe(CallRecord("ds", "proxy", "secret-finetune", 200, "", 0.3, ttft_s=0.1))
    labels = {"target": "ds", "source": "proxy", "model": "other", "code": "200", "error_type": ""}
    assert reg1.get_sample_value("opskit_llm_requests_total", labels) == 1
    assert reg2.get_sample_value("opskit_llm_requests_total", labels) is None
    names = {f.name for f in reg1.collect()}
    assert names <= {m.name.removesuffix("_total") for m in catalog.ALL}


def test_build_registry_with_gpu_collector(fake_nvml, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_STATE", str(write_state(tmp_path / "s", fake_gpus(2, util=42))))
    gpu = GpuCollector(lib_path=str(fake_nvml))
    try:
        reg, _ = exporter_server.build_registry(config.Config(), gpu)
        labels = {"gpu": "1", "uuid": uuid_for(1)}
        assert reg.get_sample_value("opskit_gpu_utilization_ratio", labels) == pytest.approx(0.42)
        assert reg.get_sample_value("opskit_gpu_up") == 1
    finally:
        gpu.close()


def test_fast_exposition_equals_generate_latest(fake_nvml, tmp_path, monkeypatch):
    import prometheus_client
    from prometheus_client import Counter, Gauge, Histogram, generate_latest

    from opskit.sidecar.fast_exposition import Renderer

    monkeypatch.setattr(prometheus_client.metrics, "_use_created", False)  # as the exporter runs
    monkeypatch.setenv("FAKE_NVML_STATE", str(write_state(tmp_path / "s", fake_gpus(3, util=42))))
    cfg = config.parse({"targets": [{"name": "t", "base_url": "http://h/v1", "daily_quota_requests": 7}]}, env={})
    gpu = GpuCollector(lib_path=str(fake_nvml))
    reg, calls = exporter_server.build_registry(cfg, gpu)
    calls.started("t", "proxy")
    calls.observe(CallRecord("t", "probe", "deepseek-chat", 200, "", 1.25, ttft_s=0.2, output_tokens=9,
                             input_tokens=3, streamed=True, ratelimit_remaining_requests=12345678.0))
    odd = Gauge("odd_values", 'help with \\ and "quotes"\nand a newline', ["a", "z", "b"], registry=reg)
    for i, v in enumerate([float("nan"), float("inf"), -float("inf"), 1e7, 1.5e-9, -3.0, 0.0, 123456789.0]):
        odd.labels(f'quote" back\\slash\nnewline é {i}', "", "x").set(v)
    Counter("plain_events_total", "no labels", registry=reg).inc(3)
    Histogram("neg_buckets", "starts below zero", ["k"], buckets=(-1, 0, 1), registry=reg).labels("v").observe(-2)
    Histogram("empty_hist", "no children yet", ["k"], registry=reg)
    try:
        r = Renderer(reg)
        for _ in range(2):  # the second render uses the cached prefixes
            assert r.render() == generate_latest(reg)
        calls.observe(CallRecord("t", "probe", "other-model", 500, "server_error", 0.5))
        assert r.render() == generate_latest(reg)
    finally:
        gpu.close()


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:0", ("127.0.0.1", 0)), (":9464", ("0.0.0.0", 9464)), ("[::1]:80", ("::1", 80)),
])
def test_parse_hostport(value, expected):
    assert exporter.parse_hostport(value) == expected


@pytest.mark.parametrize("value", ["9464", "host:", "host:http", "h:70000"])
def test_parse_hostport_rejects(value):
    with pytest.raises(ValueError, match="HOST:PORT"):
        exporter.parse_hostport(value)


def test_urls_for_logs_and_ready_file():
    assert exporter_server.redact_url("https://user:pw@api.x.com/v1?key=abc") == "https://api.x.com/v1"
    assert exporter_server.local_url("0.0.0.0", 5) == "http://127.0.0.1:5"
    assert exporter_server.local_url("::", 5) == "http://[::1]:5"
    cfg = config.parse({"targets": [{"name": "a", "base_url": "http://h:1/v1"}]}, env={})
    assert exporter_server.proxy_target(cfg, None) == ("a", "http://h:1/v1")
    assert exporter_server.proxy_target(cfg, "http://h:1/v1/") == ("a", "http://h:1/v1/")
    assert exporter_server.proxy_target(cfg, "http://other") == ("default", "http://other")


def test_proxy_target_matches_an_upstream_at_the_api_root():
    cfg = config.parse({"targets": [
        {"name": "vllm", "base_url": "http://vllm:8000/v1"},
        {"name": "root", "base_url": "http://gw:9000"},
        {"name": "gw-v1", "base_url": "http://gw:9000/v1/"},
        {"name": "v10", "base_url": "http://other:1/v10"},
    ]}, env={})
    # The server root of a /v1 base URL, with or without a trailing slash, any case of host.
    assert exporter_server.proxy_target(cfg, "http://vllm:8000") == ("vllm", "http://vllm:8000")
    assert exporter_server.proxy_target(cfg, "http://VLLM:8000/") == ("vllm", "http://VLLM:8000/")
    # An exact base URL wins over another target's root.
    assert exporter_server.proxy_target(cfg, "http://gw:9000")[0] == "root"
    assert exporter_server.proxy_target(cfg, "http://gw:9000/v1")[0] == "gw-v1"
    # Only a whole trailing /v1 segment is removed; other paths do not match.
    assert exporter_server.proxy_target(cfg, "http://other:1/v")[0] == "default"
    assert exporter_server.proxy_target(cfg, "http://vllm:8000/api")[0] == "default"
    assert exporter_server.proxy_target(cfg, "https://vllm:8000")[0] == "default"


def test_proxy_series_of_a_target_from_the_flag_keep_its_models():
    # --target makes a configured target named `default`, the proxy's fallback name too: its models
    # must still cap the proxy's model label, or every proxied call reads model="other"
    cfg = config.load(target_url="http://127.0.0.1:9/v1", env={})
    ex = exporter_server.Exporter(cfg, exporter_server.Options(listen=("127.0.0.1", 0), proxy_listen=("127.0.0.1", 0), gpu=False))
    assert ex.proxy_target == ("default", "http://127.0.0.1:9/v1")
    assert ex.metrics.model_label("default", "deepseek-chat") == "deepseek-chat"
    assert ex.metrics.model_label("default", "gpt-x") == "other"
    cfg = config.parse({"targets": [{"name": "a", "base_url": "http://h:1/v1"}]}, env={})
    opts = exporter_server.Options(listen=("127.0.0.1", 0), proxy_listen=("127.0.0.1", 0), upstream="http://else:2", gpu=False)
    ex = exporter_server.Exporter(cfg, opts)  # an upstream no target has: its models are unknown
    assert ex.proxy_target[0] == "default" and ex.metrics.model_label("default", "deepseek-chat") == "other"


def test_proxy_target_by_name():
    cfg = config.parse({"targets": [{"name": "a", "base_url": "http://h:1/v1"},
                                    {"name": "b", "base_url": "http://b:2/v1"}]}, env={})
    # The name labels the series; the upstream, given or not, says where calls go.
    assert exporter_server.proxy_target(cfg, "http://elsewhere:3", "b") == ("b", "http://elsewhere:3")
    assert exporter_server.proxy_target(cfg, "http://h:1", "b") == ("b", "http://h:1")
    assert exporter_server.proxy_target(cfg, None, "b") == ("b", "http://b:2/v1")
    with pytest.raises(config.ConfigError, match=r"--proxy-target: expected one of the configured targets \(a, b\)"):
        exporter_server.proxy_target(cfg, None, "c")


@pytest.mark.parametrize("args, needle", [
    (["--listen", "nonsense"], "HOST:PORT"),
    (["--upstream", "http://x"], "--upstream needs --proxy-listen"),
    (["--proxy-listen", "127.0.0.1:0", "--upstream", "ftp://x"], "--upstream"),
    (["--proxy-listen", "127.0.0.1:0"], "targets"),          # nothing to proxy to
    (["--probe"], "targets"),                                 # nothing to probe
    (["--config", "/nonexistent/opskit.yaml"], "opskit.yaml"),
    (["--nvml-lib", "/nonexistent/libnvidia-ml.so.1"], "nvml-lib"),
    (["--max-body-bytes", "0"], "max-body-bytes"),
    (["--proxy-target", "a", "--target", "http://h/v1"], "--proxy-target needs --proxy-listen"),
    (["--proxy-listen", "127.0.0.1:0", "--target", "http://h/v1", "--proxy-target", "nope"],
     "--proxy-target: expected one of the configured targets (default)"),
])
def test_cli_errors_are_one_line_exit_2(args, needle, clean_env):
    r = CliRunner().invoke(main, ["exporter", *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output


def test_readme_metric_list_is_the_catalogue():
    readme = (ROOT / "README.md").read_text()
    assert exporter.metrics_table() in readme, "README metric table is stale: paste exporter.metrics_table()"


def test_cli_help():
    r = CliRunner().invoke(main, ["exporter", "--help"])
    assert r.exit_code == 0
    for flag in ("--listen", "--proxy-listen", "--upstream", "--proxy-target", "--probe", "--no-gpu", "--nvml-lib",
                 "--ready-file", "--max-body-bytes", "--client-header-timeout-s", "--client-body-timeout-s",
                 "--client-idle-timeout-s", "--max-connections", "--metrics-linger-s", "--proxy-workers"):
        assert flag in r.output


# ------------------------------------------------------------------------------------ real processes

class Running:
    """A running `opskit exporter` subprocess and what its ready file said."""

    def __init__(self, proc: subprocess.Popen, info: dict) -> None:
        self.proc, self.info, self.url = proc, info, info["url"]

    def get(self, path: str) -> tuple[int, str, str]:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()

    def metrics(self) -> str:
        return self.get("/metrics")[2]

    def stop(self) -> tuple[int, str]:
        """SIGTERM; (exit code, stderr)."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err.decode()


@pytest.fixture
def start_exporter(tmp_path):
    """Factory: start_exporter(*flags, env=...) -> Running; killed at teardown if still up."""
    procs = []

    def start(*flags: str, env: dict | None = None) -> Running:
        ready = tmp_path / f"exporter-ready-{len(procs)}.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "opskit", "exporter", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
             *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env)
        procs.append(proc)
        return Running(proc, wait_for_file(ready, proc))

    yield start
    for p in procs:
        stop(p)


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPSKIT_", "NVIDIA_", "CUDA_", "FAKE_NVML")) and k != "LD_LIBRARY_PATH"}
    env.update(extra)
    return env


def sample(text: str, name: str, **labels) -> float | None:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def promtool_check(text: str) -> None:
    out = subprocess.run([need_binary("promtool"), "check", "metrics"], input=text.encode(),
                         capture_output=True, timeout=30)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


@pytest.mark.slow
def test_exporter_without_nvml_serves_and_stops_cleanly(start_exporter):
    env = base_env(OPSKIT_API_KEY=SECRET)
    ex = start_exporter("--target", "https://api.deepseek.com", env=env)
    assert ex.info["proxy_url"] is None and ex.info["pid"] == ex.proc.pid
    assert ex.get("/healthz")[:3:2] == (200, "ok")
    status, ctype, text = ex.get("/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert sample(text, "opskit_gpu_up") == 0
    assert sample(text, "opskit_gpu_utilization_ratio") is None
    assert sample(text, "opskit_build_info", version=__version__) == 1
    assert "_created" not in text
    promtool_check(text)
    ex.metrics()
    code, err = ex.stop()
    assert code == 0, err
    assert err.count("NVML unavailable") == 1       # one line, not one per scrape
    assert SECRET not in err and SECRET not in text
    assert "gpu on" in err and "probe off" in err and "Traceback" not in err


@pytest.mark.slow
def test_exporter_with_fake_nvml_through_ld_library_path(start_exporter, fake_nvml, tmp_path):
    state = write_state(tmp_path / "gpus", fake_gpus(8, util=30))
    env = base_env(LD_LIBRARY_PATH=str(fake_nvml.parent), FAKE_NVML_STATE=str(state))
    ex = start_exporter(env=env)
    text = ex.metrics()
    assert sample(text, "opskit_gpu_up") == 1
    assert [sample(text, "opskit_gpu_utilization_ratio", gpu=str(i)) for i in range(8)] == [0.3] * 8
    assert sample(text, "opskit_gpu_info", gpu="0", driver_version="550.54.15") == 1
    promtool_check(text)

    gpus = fake_gpus(8, util=30)
    gpus[2].util, gpus[5].lost, gpus[6].power_mw = 95, True, NOT_SUPPORTED
    write_state(state, gpus)
    text = ex.metrics()
    assert sample(text, "opskit_gpu_utilization_ratio", gpu="2") == 0.95
    assert sample(text, "opskit_gpu_utilization_ratio", gpu="5") is None      # lost: all its series gone
    assert sample(text, "opskit_gpu_info", gpu="5") is None
    assert sample(text, "opskit_gpu_power_watts", gpu="6") is None            # unsupported: that one only
    assert sample(text, "opskit_gpu_temperature_celsius", gpu="6") == 40
    assert sample(text, "opskit_gpu_collect_errors_total", reason="gpu_is_lost") == 1
    promtool_check(text)
    assert ex.stop()[0] == 0


@pytest.mark.slow
def test_exporter_nvml_lib_flag_and_visible_devices(start_exporter, fake_nvml, tmp_path):
    state = write_state(tmp_path / "gpus", fake_gpus(4, util=10))
    env = base_env(FAKE_NVML_STATE=str(state), NVIDIA_VISIBLE_DEVICES=f"0,{uuid_for(3)}")
    ex = start_exporter("--nvml-lib", str(fake_nvml), env=env)
    text = ex.metrics()
    present = [i for i in range(4) if sample(text, "opskit_gpu_utilization_ratio", gpu=str(i)) is not None]
    assert present == [0, 3]
    assert ex.stop()[0] == 0


@pytest.mark.slow
def test_exporter_no_gpu_flag(start_exporter):
    ex = start_exporter("--no-gpu", env=base_env())
    text = ex.metrics()
    assert "opskit_gpu_up" not in text
    promtool_check(text)
    code, err = ex.stop()
    assert code == 0 and "gpu off" in err and "NVML" not in err


@pytest.mark.slow
def test_exporter_meters_calls_through_the_proxy(start_exporter, mock_server):
    openai = pytest.importorskip("openai")
    ex = start_exporter("--no-gpu", "--proxy-listen", "127.0.0.1:0", "--upstream", mock_server.url,
                        env=base_env())
    client = openai.OpenAI(base_url=ex.info["proxy_url"] + "/v1", api_key=SECRET, timeout=20, max_retries=0)
    stream = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True}, max_tokens=8)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    text = ex.metrics()
    assert sample(text, "opskit_llm_requests_total", target="default", source="proxy", code="200",
                  error_type="") == 1
    assert sample(text, "opskit_llm_time_to_first_token_seconds_count", target="default") == 1
    assert SECRET not in text
    promtool_check(text)
    code, err = ex.stop()
    assert code == 0 and SECRET not in err and "proxy http://127.0.0.1:" in err


def test_upstream_timeout_flag_ends_a_silent_call_504(start_exporter, start_mock):
    mock = start_mock("--hang-rate", "1")
    ex = start_exporter("--no-gpu", "--proxy-listen", "127.0.0.1:0", "--upstream", mock.url,
                        "--upstream-timeout-s", "0.5", env=base_env())
    req = urllib.request.Request(ex.info["proxy_url"] + "/v1/chat/completions", method="POST",
                                 data=json.dumps({"model": "deepseek-chat",
                                                  "messages": [{"role": "user", "content": "hi"}]}).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=20)
    assert err.value.code == 504 and time.monotonic() - t0 < 5  # not the 300 s default
    assert sample(ex.metrics(), "opskit_llm_requests_total", target="default", source="proxy", code="504",
                  error_type="timeout") == 1


@pytest.mark.slow
@pytest.mark.parametrize("flags, label", [([], "llm"), (["--proxy-target", "other"], "other")])
def test_proxy_at_the_server_root_keeps_the_v1_base_url_and_the_target_name(
        start_exporter, mock_server, tmp_path, flags, label):
    """vLLM's layout: the target's base_url ends in /v1, the proxy forwards to the server root, and
    clients keep `http://proxy/v1` as their base URL. By default the proxy's series take the name of
    the target at that root, the probe's; --proxy-target names the target explicitly."""
    openai = pytest.importorskip("openai")
    cfg = tmp_path / "opskit.yaml"
    cfg.write_text(f"""targets:
  - {{name: llm, base_url: "{mock_server.api}", models: [deepseek-chat]}}
  - {{name: other, base_url: "http://127.0.0.1:9/v1", models: [deepseek-chat]}}
probe: {{interval_s: 60, max_tokens: 4, timeout_s: 5}}
""")
    ex = start_exporter("--no-gpu", "--config", str(cfg), "--proxy-listen", "127.0.0.1:0",
                        "--upstream", mock_server.url, *flags, env=base_env())
    client = openai.OpenAI(base_url=ex.info["proxy_url"] + "/v1", api_key=SECRET, timeout=20, max_retries=0)
    reply = client.chat.completions.create(model="deepseek-chat", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    text = ex.metrics()
    calls = [(s.labels["target"], s.labels["source"], s.value) for f in text_string_to_metric_families(text)
             for s in f.samples if s.name == "opskit_llm_requests_total"]
    assert calls == [(label, "proxy", 1.0)], calls
    code, err = ex.stop()
    assert code == 0 and f"-> {mock_server.url} as target {label}" in err


@pytest.mark.slow
def test_exporter_proxy_and_probe_share_the_target_at_the_server_root(start_exporter, mock_server, tmp_path):
    cfg = tmp_path / "opskit.yaml"
    cfg.write_text(f"""targets:
  - {{name: llm, base_url: "{mock_server.api}", models: [deepseek-chat]}}
probe: {{interval_s: 0.5, max_tokens: 4, timeout_s: 5}}
""")
    ex = start_exporter("--no-gpu", "--config", str(cfg), "--probe", "--proxy-listen", "127.0.0.1:0",
                        "--upstream", mock_server.url + "/", env=base_env())
    body = b'{"model": "deepseek-chat", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}'
    req = urllib.request.Request(ex.info["proxy_url"] + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    deadline = time.monotonic() + 10
    while True:
        text = ex.metrics()
        labels = {(s.labels["target"], s.labels["source"]) for f in text_string_to_metric_families(text)
                  for s in f.samples if s.name == "opskit_llm_requests_total"}
        if len(labels) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert labels == {("llm", "proxy"), ("llm", "probe")}


@pytest.mark.slow
def test_sigterm_drains_an_in_flight_stream_then_exits_0(start_exporter, start_mock):
    openai = pytest.importorskip("openai")
    mock = start_mock("--itl-ms", "60", "--itl-jitter-ms", "0", "--output-tokens-mean", "20",
                      "--output-tokens-spread", "0")
    ex = start_exporter("--no-gpu", "--proxy-listen", "127.0.0.1:0", "--upstream", mock.url,
                        "--metrics-linger-s", "0", env=base_env())  # (the linger has its own test below)
    client = openai.OpenAI(base_url=ex.info["proxy_url"] + "/v1", api_key="x", timeout=20, max_retries=0)
    stream = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True})
    finish, usage, signalled = None, None, False
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and not signalled:
            ex.proc.send_signal(signal.SIGTERM)   # mid-stream: ~1 s of tokens still to come
            signalled = True
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        usage = chunk.usage or usage
    assert signalled and finish is not None and usage.completion_tokens == 20   # the stream was not cut
    _, err = ex.proc.communicate(timeout=30)
    assert ex.proc.returncode == 0, err.decode()
    assert "draining" in err.decode()


def _stderr_line(proc: subprocess.Popen, needle: str, timeout: float = 20.0) -> str:
    """Read the process's stderr (raw, so select() sees every byte) until a line contains `needle`."""
    deadline, fd, text = time.monotonic() + timeout, proc.stderr.fileno(), ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        data = os.read(fd, 65536) if ready else b""
        if not data:
            break
        text += data.decode()
        for line in text.splitlines():
            if needle in line:
                return line
    raise AssertionError(f"no stderr line with {needle!r} in {timeout}s: {text}")


@pytest.mark.slow
def test_sigterm_keeps_metrics_up_until_calls_of_the_drain_are_scraped(start_exporter, start_mock):
    openai = pytest.importorskip("openai")
    mock = start_mock("--itl-ms", "40", "--itl-jitter-ms", "0", "--output-tokens-mean", "10",
                      "--output-tokens-spread", "0")
    ex = start_exporter("--no-gpu", "--proxy-listen", "127.0.0.1:0", "--upstream", mock.url,
                        "--metrics-linger-s", "60", env=base_env())
    client = openai.OpenAI(base_url=ex.info["proxy_url"] + "/v1", api_key="x", timeout=20, max_retries=0)
    stream = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    next(iter(stream))
    ex.proc.send_signal(signal.SIGTERM)  # the call finishes during the drain...
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    _stderr_line(ex.proc, "/metrics stays up until scraped")  # ...the drain is over, the proxy closed
    assert sample(ex.metrics(), "opskit_llm_requests_total", source="proxy", code="200", error_type="") == 1
    ex.proc.wait(20)  # that scrape had every call: no need to wait out the 60 s
    assert ex.proc.returncode == 0


@pytest.mark.slow
def test_metrics_listener_is_guarded(start_exporter):
    ex = start_exporter("--no-gpu", "--client-header-timeout-s", "0.3", env=base_env())
    port = int(ex.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHo")  # a head that never ends
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408 ")
    assert ex.get("/healthz")[0] == 200
    text = ex.metrics()
    assert sample(text, "opskit_exporter_connections_refused_total", listener="metrics") == 0  # from the start
    promtool_check(text)


@pytest.mark.slow
def test_exporter_probes_every_configured_target(start_exporter, mock_server, tmp_path):
    cfg = tmp_path / "opskit.yaml"
    cfg.write_text(f"""targets:
  - {{name: primary, base_url: "{mock_server.api}", models: [deepseek-chat]}}
  - {{name: fallback, base_url: "{mock_server.api}", models: [deepseek-chat]}}
probe: {{interval_s: 60, max_tokens: 4, timeout_s: 10}}
""")
    ex = start_exporter("--no-gpu", "--config", str(cfg), "--probe", env=base_env())
    deadline = time.monotonic() + 20
    while True:
        text = ex.metrics()
        done = [sample(text, "opskit_probe_success", target=t) for t in ("primary", "fallback")]
        if None not in done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert done == [1, 1], text
    assert sample(text, "opskit_llm_requests_total", target="fallback", source="probe", code="200") == 1
    promtool_check(text)
    code, err = ex.stop()
    assert code == 0 and "probe primary,fallback" in err
    assert "draining" not in err and err.rstrip().endswith("stopped")  # no proxy, nothing to drain


@pytest.mark.slow
def test_exporter_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "opskit", "exporter", "--no-gpu", "--listen",
                              f"127.0.0.1:{port}"], capture_output=True, timeout=30, cwd=ROOT, env=base_env())
    err = out.stderr.decode()
    assert out.returncode == 1 and "cannot listen" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_exporter_unwritable_ready_file_is_one_line(tmp_path):
    """A ready file that cannot be written is named as such, not reported as an address problem."""
    ready = tmp_path / "no-such-dir" / "ready.json"
    out = subprocess.run([sys.executable, "-m", "opskit", "exporter", "--no-gpu", "--listen", "127.0.0.1:0",
                          "--ready-file", str(ready)], capture_output=True, timeout=30, cwd=ROOT, env=base_env())
    err = out.stderr.decode()
    assert out.returncode == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == f"Error: cannot write the ready file {ready}: No such file or directory", err
