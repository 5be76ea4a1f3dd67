"""`opskit exporter --proxy-workers N`: shared counts merged exactly, workers restarted, the real openai SDK.

Unit tests drive the shared-memory store and merger in-process against prometheus_client's own
CallMetrics (the same calls split over two workers must expose the same series as one registry that
saw them all). Integration tests run the real exporter with 2 workers against the real mock and check
that counts reconcile with the mock's own, also across a worker killed mid-run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from opskit.core import records
from opskit.core.processes import Backoff
from opskit.core.records import CallRecord
from opskit.sidecar.call_metrics import CallMetrics
from opskit.sidecar.fast_exposition import Renderer
from opskit.sidecar.proxy_workers import available_cpus
from opskit.sidecar.shared_counts import Merger, Segment, Store
from tests.conftest import ROOT, stop, wait_for_file

MODELS = {"t": ("deepseek-chat",)}


def _record(rng: random.Random) -> CallRecord:
    streamed = rng.random() < 0.5
    code, err = rng.choice([(200, records.OK)] * 6 + [(429, records.RATE_LIMITED), (500, records.SERVER_ERROR),
                                                       (200, records.STREAM_BROKEN), (0, records.CONNECTION)])
    duration = rng.uniform(0.001, 40)
    return CallRecord(target="t", source="proxy", model=rng.choice(["deepseek-chat", "gpt-x"]), code=code,
                      error_type=err, duration_s=duration, streamed=streamed,
                      ttft_s=duration * rng.random() if streamed and code == 200 else None,
                      input_tokens=rng.randint(0, 500), output_tokens=rng.randint(0, 300),
                      cached_input_tokens=rng.randint(0, 50), reasoning_tokens=rng.randint(0, 20),
                      ratelimit_remaining_requests=float(rng.randint(0, 100)))


def _samples(registry: CollectorRegistry) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(Renderer(registry).render().decode()):
        for s in fam.samples:
            if not s.name.endswith("_created"):  # when made, not what was counted (the exporter leaves them out)
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _by_name(metrics: CallMetrics) -> dict[str, object]:
    return {m._name: m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}


def test_calls_split_over_two_workers_merge_into_the_series_of_one_registry():
    rng = random.Random(5)
    calls = [_record(rng) for _ in range(3000)]
    one = CollectorRegistry()
    reference = CallMetrics(one, MODELS)
    segments = [Segment.create(), Segment.create()]
    workers = [CallMetrics(Store(seg), MODELS) for seg in segments]
    for rec in calls:
        w = workers[rng.randrange(2)]
        for m in (reference, w):
            m.started("t", "proxy")
            m.finished(rec)
    workers[0].started("t", "proxy")  # one call still in flight on worker 0
    reference.started("t", "proxy")
    merged_registry = CollectorRegistry()
    merger = Merger(segments, _by_name(CallMetrics(merged_registry, MODELS)))
    merger.merge()
    want, got = _samples(one), _samples(merged_registry)
    assert set(got) == set(want)
    for key, value in want.items():
        if key[0].endswith("_sum"):  # float sums added in another order
            assert got[key] == pytest.approx(value, rel=1e-9), key
        elif key[0] != "opskit_llm_ratelimit_remaining_requests":
            assert got[key] == value, key  # counts, buckets, tokens, in flight: exact
    assert merger.total("opskit_llm_requests") == len(calls)
    assert got[("opskit_llm_requests_in_flight", (("source", "proxy"), ("target", "t")))] == 1
    # the gauge of the last value: the worker that set it most recently
    last = calls[-1].ratelimit_remaining_requests
    assert got[("opskit_llm_ratelimit_remaining_requests", (("source", "proxy"), ("target", "t")))] == last
    assert merger.merge("opskit_llm_requests") == len(calls)  # merging again sets, never adds
    assert _samples(merged_registry) == got


def test_a_replacement_worker_goes_on_counting_where_the_dead_one_stopped():
    seg = Segment.create()
    first = CallMetrics(Store(seg), MODELS)
    rec = CallRecord(target="t", source="proxy", model="deepseek-chat", code=200, error_type="", duration_s=0.5,
                     output_tokens=7)
    for _ in range(3):
        first.started("t", "proxy")
        first.finished(rec)
    first.started("t", "proxy")  # in flight when it dies
    first.started("t", "proxy")
    seg.before_start()  # what the exporter does before starting the replacement
    second = CallMetrics(Store(seg), MODELS)  # attaches the same segment
    second.started("t", "proxy")
    second.finished(rec)
    registry = CollectorRegistry()
    Merger([seg], _by_name(CallMetrics(registry, MODELS))).merge()
    base = {"target": "t", "source": "proxy", "model": "deepseek-chat"}
    assert registry.get_sample_value("opskit_llm_requests_total", {**base, "code": "200", "error_type": ""}) == 4
    assert registry.get_sample_value("opskit_llm_tokens_total", {**base, "token_type": "output"}) == 28
    assert registry.get_sample_value("opskit_llm_requests_in_flight", {"target": "t", "source": "proxy"}) == 0
    assert seg.count == len({*Store(seg)._slots})  # no label set made twice


def test_available_cpus_takes_affinity_and_cgroup_quota(tmp_path):
    assert available_cpus({0, 1, 2, 3}, tmp_path) == 4  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus({0, 1, 2, 3}, tmp_path) == 4
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 processes
    assert available_cpus({0, 1, 2, 3}, tmp_path) == 2
    assert available_cpus({0}, tmp_path) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(set(range(8)), tmp_path) == 3
    assert available_cpus(None) >= 1


def test_backoff_grows_for_quick_exits_and_resets_after_a_long_run():
    b = Backoff(first=0.5, most=4, stable_s=60)
    assert [b.after(1) for _ in range(5)] == [0.5, 1, 2, 4, 4]
    assert b.after(61) == 0
    assert b.after(1) == 0.5


def test_cli_refuses_bad_worker_counts():
    from click.testing import CliRunner

    from opskit.cli import main
    r = CliRunner().invoke(main, ["exporter", "--no-gpu", "--proxy-workers", "0", "--proxy-listen", "127.0.0.1:0",
                                  "--target", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "--proxy-workers" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["exporter", "--no-gpu", "--proxy-workers", "2", "--target", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "--proxy-workers needs --proxy-listen" in r.output


# ------------------------------------------------------------------ real exporter, 2 workers, real openai SDK

FAST = ("--ttft-ms", "5", "--ttft-jitter-ms", "0", "--itl-ms", "2", "--itl-jitter-ms", "0",
        "--output-tokens-mean", "10", "--output-tokens-spread", "0")


class Exporter:
    def __init__(self, tmp_path: Path, upstream: str, *extra: str) -> None:
        ready = tmp_path / "exporter.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opskit", "exporter", "--no-gpu", "--listen", "127.0.0.1:0", "--proxy-listen",
             "127.0.0.1:0", "--upstream", upstream, "--proxy-workers", "2", "--ready-file", str(ready),
             "--metrics-linger-s", "0", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        info = wait_for_file(ready, self.proc)
        self.url, self.proxy = info["url"], info["proxy_url"]

    def workers(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return sorted(int(p) for p in out.split())

    def samples(self) -> dict[tuple, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sum(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def _sdk_calls(base_url: str, n_threads: int, per_thread: int | None, stop_at: float | None, out: dict) -> None:
    """Mixed streamed / non-streamed SDK calls from threads; outcomes counted in `out`."""
    import openai

    lock = threading.Lock()

    def run(t: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key="sk-test-not-a-real-key", max_retries=0, timeout=10)
        i = 0
        while (per_thread is None or i < per_thread) and (stop_at is None or time.monotonic() < stop_at):
            kw = {"model": "deepseek-chat", "messages": [{"role": "user", "content": f"q{t}-{i}"}], "max_tokens": 10}
            kind = "stream" if (t + i) % 2 else "plain"
            try:
                if kind == "stream":
                    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                                 **kw))
                    ok = bool(chunks) and chunks[-1].usage is not None
                else:
                    ok = client.chat.completions.create(**kw).usage.completion_tokens == 10
                key = kind if ok else "bad"
            except (openai.APIError, httpx.HTTPError) as exc:
                key = "failed"  # a worker killed with this call in flight
                if os.environ.get("OPSKIT_DEBUG_SDK"):
                    print("SDK failure:", type(exc).__name__, exc, file=sys.stderr)
            with lock:
                out[key] = out.get(key, 0) + 1
            i += 1

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)


def _admin(mock) -> dict:
    return httpx.get(mock.admin_url + "/admin/counters", timeout=10).json()


@pytest.mark.slow
def test_two_workers_count_exactly_what_the_mock_served(start_mock, tmp_path):
    mock = start_mock("--seed", "11", *FAST)
    exp = Exporter(tmp_path, mock.url)
    try:
        assert len(exp.workers()) == 2
        out: dict[str, int] = {}
        _sdk_calls(exp.proxy + "/v1", 8, 25, None, out)
        assert out == {"stream": 100, "plain": 100}
        s, truth = exp.samples(), _admin(mock)
        assert truth["requests"] == {"200": 200}
        assert _sum(s, "opskit_llm_requests_total", code="200", error_type="") == 200
        assert _sum(s, "opskit_llm_requests_total") == 200
        assert _sum(s, "opskit_llm_tokens_total", token_type="output") == truth["tokens"]["output"] == 2000
        assert _sum(s, "opskit_llm_tokens_total", token_type="input") == truth["tokens"]["input"]
        assert _sum(s, "opskit_llm_request_duration_seconds_count", stream="true") == 100
        assert _sum(s, "opskit_llm_request_duration_seconds_count", stream="false") == 100
        assert _sum(s, "opskit_llm_request_duration_seconds_bucket", stream="true", le="+Inf") == 100
        assert _sum(s, "opskit_llm_time_to_first_token_seconds_count") == truth["streams_completed"] == 100
        assert _sum(s, "opskit_llm_requests_in_flight") == 0
    finally:
        stop(exp.proc)
    assert exp.proc.returncode == 0


@pytest.mark.slow
def test_each_worker_writes_its_own_call_log_and_the_counts_merge(start_mock, tmp_path):
    import gzip
    import json

    mock = start_mock("--seed", "13", *FAST)
    logdir = tmp_path / "calls"
    exp = Exporter(tmp_path, mock.url, "--call-log", str(logdir))
    try:
        out: dict[str, int] = {}
        _sdk_calls(exp.proxy + "/v1", 6, 10, None, out)
        assert out == {"stream": 30, "plain": 30}
        deadline = time.monotonic() + 10
        while _sum(exp.samples(), "opskit_call_log_records_total") < 60 and time.monotonic() < deadline:
            time.sleep(0.2)  # the writers flush every 0.2 s
        s = exp.samples()
        assert _sum(s, "opskit_call_log_records_total") == 60
        assert _sum(s, "opskit_call_log_dropped_total") == 0
    finally:
        stop(exp.proc)
    assert exp.proc.returncode == 0
    files = sorted(p.name for p in logdir.glob("calls-*"))
    assert files and all(f.endswith(".jsonl.gz") for f in files), files  # closed and compressed at stop
    assert {f.split("-w")[-1].split(".")[0] for f in files} <= {"0", "1"}
    records = []
    for path in logdir.glob("calls-*.jsonl.gz"):
        with gzip.open(path, "rt") as f:
            records += [json.loads(line) for line in f]
    assert len(records) == 60
    assert sum(r["stream"] for r in records) == 30
    assert sum(r["tokens"]["output"] for r in records) == 600
    assert "sk-test-not-a-real-key" not in "".join(json.dumps(r) for r in records)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_counts_neither_go_back_nor_double(start_mock, tmp_path):
    mock = start_mock("--seed", "12", *FAST)
    exp = Exporter(tmp_path, mock.url)
    try:
        before = exp.workers()
        assert len(before) == 2
        out: dict[str, int] = {}
        load = threading.Thread(target=_sdk_calls, args=(exp.proxy + "/v1", 6, None, time.monotonic() + 8, out))
        load.start()
        seen, victim_killed = [], False
        deadline = time.monotonic() + 30
        while load.is_alive() and time.monotonic() < deadline:
            seen.append(_sum(exp.samples(), "opskit_llm_requests_total"))
            if not victim_killed and seen[-1] >= 60:
                os.kill(before[0], signal.SIGKILL)
                victim_killed = True
            time.sleep(0.2)
        load.join(60)
        assert victim_killed
        assert seen == sorted(seen), "a counter went backwards"
        after = exp.workers()
        assert len(after) == 2 and before[0] not in after and before[1] in after
        s, truth = exp.samples(), _admin(mock)
        ok = out.get("stream", 0) + out.get("plain", 0)
        counted = _sum(s, "opskit_llm_requests_total")
        assert out.get("bad", 0) == 0
        # every call the SDK saw succeed is counted once; calls lost with the worker are not counted
        assert counted == _sum(s, "opskit_llm_requests_total", code="200", error_type="") == ok
        served = sum(truth["requests"].values())
        assert counted <= served <= counted + out.get("failed", 0)
        assert _sum(s, "opskit_llm_tokens_total", token_type="output") == 10 * ok
        assert _sum(s, "opskit_llm_requests_in_flight") == 0
    finally:
        stop(exp.proc)
    err = exp.proc.stderr.read().decode()
    assert "proxy worker" in err and "starting it again" in err and "Traceback" not in err


@pytest.mark.slow
def test_workers_do_not_outlive_a_killed_exporter(start_mock, tmp_path):
    mock = start_mock(*FAST)
    exp = Exporter(tmp_path, mock.url)
    workers = exp.workers()
    assert len(workers) == 2
    exp.proc.kill()
    exp.proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.1)
    alive = [p for p in workers if Path(f"/proc/{p}/stat").exists()
             and Path(f"/proc/{p}/stat").read_text().rpartition(") ")[2][:1] not in ("Z", "X")]
    assert alive == [], "workers outlived the exporter"


@pytest.mark.slow
def test_a_taken_proxy_port_is_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "opskit", "exporter", "--no-gpu", "--listen", "127.0.0.1:0",
                              "--proxy-listen", f"127.0.0.1:{port}", "--upstream", "http://127.0.0.1:9",
                              "--proxy-workers", "2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1 and "cannot listen" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.slow
def test_a_second_exporter_cannot_join_the_first_ones_proxy_port(start_mock, tmp_path):
    mock = start_mock(*FAST)
    exp = Exporter(tmp_path, mock.url)
    try:
        port = exp.proxy.rsplit(":", 1)[1]
        out = subprocess.run([sys.executable, "-m", "opskit", "exporter", "--no-gpu", "--listen", "127.0.0.1:0",
                              "--proxy-listen", f"127.0.0.1:{port}", "--upstream", mock.url, "--proxy-workers", "2"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 1 and "cannot listen" in out.stderr, out.stderr
    finally:
        stop(exp.proc)
