"""The release gate end to end: real Locust subprocesses against a real `opskit mock`.

Each run is a few seconds. `opskit loadtest` runs as a subprocess too, as `make loadtest` runs it, so
exit codes and printed output are exactly what a user sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from opskit.loadtest import results

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def loadtest(tmp_path: Path, *args: str, timeout: float = 90,
             env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path | None]:
    """Run `opskit loadtest ARGS --out tmp/reports`; returns the result and the run directory.

    The developer's own OPSKIT_* settings (a real target, a key) are kept away from it; `env` adds variables.
    """
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPSKIT_")}, **(env or {})}
    out = tmp_path / "reports"
    proc = subprocess.run([sys.executable, "-m", "opskit", "loadtest", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
    runs = sorted(out.glob("*/")) if out.exists() else []
    return proc, (runs[-1] if runs else None)


def test_healthy_mock_passes_through_the_proxy_with_two_processes(tmp_path):
    proc, run = loadtest(tmp_path, "qps", "streaming", "--duration", "4", "--processes", "2", "--rate", "30",
                         "--users", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "VERDICT: PASS" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    checks = {(c["scenario"], c["name"]): c for c in summary["checks"]}
    # every request the clients saw was metered by the proxy, by status code
    assert checks[("qps", "proxy_reconciled")]["passed"] and checks[("streaming", "proxy_reconciled")]["passed"]
    qps = summary["scenarios"]["qps"]
    assert qps["requested_rate"] == 30 and qps["achieved_rate"] == pytest.approx(30, rel=0.03)
    df = results.load(run)
    assert set(df["worker"]) == {0, 1}  # both Locust workers sent their share
    assert (df["output_tokens"] == df["mock_output_tokens"]).all()
    page = (run / "report.html").read_text()
    assert "PASS" in page and page.count("<figcaption>Is time to first token within its SLO over time?") == 2
    assert page.count("SLO TTFT p95 &lt; 500 ms") == 4  # over time and among the percentiles, per scenario
    assert (run / "locust" / "qps_stats.csv").exists() and (run / "locust" / "streaming.html").exists()
    for name in ("qps", "streaming"):  # Locust's CSV counts every call too (it lost its last second)
        stats = pd.read_csv(run / "locust" / f"{name}_stats.csv").set_index("Name")
        assert stats.loc["Aggregated", "Request Count"] == (df["scenario"] == name).sum()
    assert list((run / "log").glob("requests-*.jsonl"))


def test_injected_errors_fail_the_gate_naming_the_error_ratio(tmp_path):
    proc, run = loadtest(tmp_path, "qps", "--duration", "4", "--rate", "60", "--timeout", "2", "--mock-args",
                         "--error-rate 500=0.08 --hang-rate 0.03 --cut-rate 0.03 --seed 3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "VERDICT: FAIL (missed: qps error_ratio)" in proc.stdout.splitlines()[-2]
    assert "server_error" in proc.stdout
    # faults and all, the proxy saw exactly what the clients saw (hung calls still open there count too)
    checks = {c["name"]: c for c in json.loads((run / "summary.json").read_text())["checks"]}
    assert checks["proxy_reconciled"]["passed"], checks["proxy_reconciled"]["note"]
    errors = json.loads((run / "summary.json").read_text())["scenarios"]["qps"]["errors"]
    assert {"server_error", "timeout", "stream_broken"} <= set(errors)


def test_slow_first_token_fails_the_gate_naming_ttft(tmp_path):
    proc, _ = loadtest(tmp_path, "streaming", "--duration", "3", "--users", "10", "--no-proxy",
                       "--mock-args", "--extra-ttft-ms 1000")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "streaming ttft_p95" in proc.stdout.splitlines()[-2]


@pytest.mark.serial
def test_throttling_passes_with_a_limit_and_fails_without_one(tmp_path, start_mock):
    limited = start_mock("--rpm", "20", "--rate-window-s", "3")
    args = ("throttling", "--duration", "5", "--limit-requests", "20", "--limit-window-s", "3", "--no-proxy")
    proc, run = loadtest(tmp_path / "a", *args, "--target", limited.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    t = json.loads((run / "summary.json").read_text())["scenarios"]["throttling"]["throttling"]
    assert t["rate_limited"] > 0 and t["missing_retry_after"] == 0 and t["max_accepted_in_window"] <= 20
    assert t["recovered"] > 0  # clients came back after Retry-After

    open_mock = start_mock()  # no rate limit: lets everything through
    proc, _ = loadtest(tmp_path / "b", *args, "--target", open_mock.url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "throttling accepted_within_limit" in proc.stdout.splitlines()[-2]


def test_conversation_context_grows_and_websocket_streams(tmp_path, mock_server):
    # a baseline ten times faster than the mock can be: the SLOs pass, the comparison fails the run
    base = tmp_path / "base"
    base.mkdir()
    (base / "summary.json").write_text(json.dumps({"scenarios": {"conversation": {
        "ttft_s": {"p50": 0.005, "p95": 0.006, "p99": 0.007}, "throughput_rps": 1000.0, "error_ratio": 0.0}}}))
    proc, run = loadtest(tmp_path, "conversation", "--duration", "4", "--users", "4", "--no-proxy",
                         "--target", mock_server.url, "--baseline", str(base))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "VERDICT: PASS" in proc.stdout and "COMPARE: REGRESSION in conversation ttft_p50, " in proc.stdout
    page = (run / "report.html").read_text()  # the comparison travels with the report
    assert f"<h2>Against the baseline</h2><p>{base}: REGRESSION in conversation ttft_p50, " in page
    turns = json.loads((run / "summary.json").read_text())["scenarios"]["conversation"]["by_turn"]
    sizes = [turns[k]["input_tokens_mean"] for k in sorted(turns)]
    assert sizes == sorted(sizes) and sizes[-1] > 2 * sizes[0]
    # each turn resends the conversation so far, so the mock's context cache hits more of it
    hits = [turns[k]["cache_hit_ratio"] for k in sorted(turns)]
    assert hits[-1] > hits[0] and hits[-1] > 0.5, hits

    proc, run = loadtest(tmp_path / "ws", "streaming", "--duration", "3", "--users", "5", "--transport", "ws",
                         "--model", "deepseek-reasoner", "--target", mock_server.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"target {mock_server.url}; run directory" in proc.stderr  # direct: not "via metering proxy"
    df = results.load(run)
    assert (df["transport"] == "ws").all() and df["ttft_s"].notna().all() and (df["output_tokens"] > 0).all()
    # a reasoning model thinks first: the first output token comes after the first (reasoning) token
    assert (df["ttfot_s"] > df["ttft_s"]).all()


@pytest.mark.serial
def test_timings_match_the_mock_ground_truth_at_100_streams(tmp_path, start_mock):
    """TTFT, ITL and duration against the mock's exact schedule (no jitter); token counts exact.

    The strict 2 ms p99 figure is measured by bench/loadgen_capacity.py; on this shared 2-core
    machine (mock, Locust and other people's tests on the same cores, where a stolen time slice delays
    a token by tens of ms) the test asks for a 15 ms median and a 40 ms p95: loose, yet it catches the
    real mistakes (timing the role-only chunk, reading whole buffers late, batching tokens), each of
    which is off by a whole 100 ms gap. The median bound was 10 ms; run alone on this machine the
    first release's own code measured 10.3-11.8 ms medians in some runs, as today's does.
    """
    mock = start_mock("--ttft-ms", "100", "--ttft-jitter-ms", "0", "--itl-ms", "100", "--itl-jitter-ms", "0",
                      "--output-tokens-mean", "12", "--output-tokens-spread", "0", "--seed", "1")
    proc, run = loadtest(tmp_path, "streaming", "--duration", "5", "--users", "100", "--no-proxy",
                         "--output-tokens", "40", "--output-spread", "0", "--target", mock.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = results.load(run)
    assert len(df) >= 100 and df["ok"].all()
    assert (df["output_tokens"] == df["mock_output_tokens"]).all() and (df["output_tokens"] == 12).all()
    assert df["tokens_from_usage"].all()
    # a user's first request also pays for its TCP connect, which the mock's clock does not see
    steady = df[df["seq"] > 1]
    ttft_err = (steady["ttft_s"] - steady["mock_ttft_ms"] / 1000).abs()
    dur_err = (steady["duration_s"] - (steady["mock_ttft_ms"] / 1000 + 11 * 0.100)).abs()
    gaps = pd.Series([g for gs in steady["itl"] for g in gs])
    assert len(gaps) == 11 * len(steady)
    for err in (ttft_err, dur_err, (gaps - 0.100).abs()):
        assert err.quantile(0.5) < 0.015 and err.quantile(0.95) < 0.040


def test_usage_errors_exit_2_with_one_line(tmp_path):
    proc, _ = loadtest(tmp_path, "nosuch", "--duration", "1", "--no-proxy")
    assert proc.returncode == 2 and "unknown scenario 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: [{name: x, base_url: ftp://nope}]\n")
    proc, _ = loadtest(tmp_path, "qps", "--config", str(bad))
    assert proc.returncode == 2 and "base_url" in proc.stderr and "Traceback" not in proc.stderr
    proc, _ = loadtest(tmp_path, "qps", "--target", "http://127.0.0.1:9", "--mock-args", "--error-rate 500=1")
    assert proc.returncode == 2 and "--mock-args" in proc.stderr
    proc, _ = loadtest(tmp_path, "qps", "--baseline", str(tmp_path))
    assert proc.returncode == 2 and "summary.json" in proc.stderr and "Traceback" not in proc.stderr


def test_hmac_auth_from_config_through_the_proxy_and_no_secret_leaks(tmp_path, start_mock):
    secret = "s3cr3t-signing-value"
    mock = start_mock("--auth", "hmac", "--api-key", f"kid-1:{secret}")
    cfg = tmp_path / "opskit.yaml"
    cfg.write_text(f"targets:\n  - name: mock\n    base_url: {mock.url}\n    auth: {{scheme: hmac, "
                   "api_key_env: LT_KEY_ID, secret_key_env: LT_SECRET}\n")
    env = {"LT_KEY_ID": "kid-1", "LT_SECRET": secret}
    proc, run = loadtest(tmp_path / "good", "streaming", "--config", str(cfg), "--duration", "3", "--users", "4",
                         env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "proxy_reconciled" in proc.stdout  # the signed requests went through the metering proxy
    written = "".join(p.read_text(errors="replace") for p in run.rglob("*") if p.is_file())
    assert secret not in written + proc.stdout + proc.stderr

    # a wrong secret: the canary call is refused and no load follows (it ran the whole duration of 401s)
    before = _counters(mock)["by_path"].get("/chat/completions", 0)
    proc, _ = loadtest(tmp_path / "bad", "streaming", "--config", str(cfg), "--duration", "20", "--users", "2",
                       "--no-proxy", env={**env, "LT_SECRET": "wrong-zz-hmac"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "canary call failed, no load sent: HTTP 401" in proc.stderr and "auth scheme hmac" in proc.stderr
    assert _counters(mock)["by_path"].get("/chat/completions", 0) - before == 1
    assert "wrong-zz-hmac" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def _counters(mock) -> dict:
    import urllib.request

    with urllib.request.urlopen(mock.admin_url + "/admin/counters", timeout=10) as resp:
        return json.loads(resp.read())


def test_an_overloaded_open_loop_scheduler_still_ends_with_its_run(tmp_path):
    """Far more arrivals than one process can send (a hand-run or distributed Locust can ask for them;
    `opskit loadtest` refuses): the scheduler never yielded when behind, so Locust could not stop it,
    and a 1 s run wrote 80 MB of "dropped" rows without end."""
    import socket

    from opskit.loadtest.log import read_rows
    from opskit.loadtest.params import ENV, RunParams

    with socket.socket() as silent:  # accepts connections (the backlog) and never answers: one request hangs
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        params = RunParams(scenario="qps", run_dir=str(tmp_path), base_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                           duration=1.0, users=1, timeout_s=2.0, stream=False, max_inflight=1,
                           arrival={"kind": "fixed", "rate": 1e9})
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPSKIT_")}, ENV: params.to_env()}
        proc = subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "qps.py"), "--headless",
                               "-u", "1", "-r", "1", "--run-time", "3s", "--stop-timeout", "4", "--only-summary",
                               "--loglevel", "WARNING", "--exit-code-on-error", "0"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "log" / "lag-qps-0.json").exists()  # Locust's stop ran its hooks: a normal end
    rows = read_rows(tmp_path / "log")
    sent = [r for r in rows if r.get("error") != "dropped: max in-flight reached"]
    assert [r["t_sent"] is not None for r in sent] == [True]  # the one request in flight; all else dropped
    assert len(rows) > 1
    assert "Traceback" not in proc.stderr


def test_refused_oauth2_credentials_stop_the_run_with_one_line(tmp_path, start_mock):
    # A wrong client secret fetched a token for every request (~200 a second), killed each request's
    # greenlet with a traceback and ended in "no request completed" after the whole duration.
    import urllib.request

    mock = start_mock("--auth", "oauth2", "--client", "app:right-secret")
    cfg = tmp_path / "opskit.yaml"
    cfg.write_text(f"targets:\n  - name: mock\n    base_url: {mock.url}\n    auth: {{scheme: oauth2, token_url: "
                   f"{mock.url}/oauth/token, client_id: app, client_secret_env: LT_CLIENT_SECRET}}\n")
    # a 60 s run that must stop on its own well before the 45 s this test waits for it
    proc, run = loadtest(tmp_path, "streaming", "--config", str(cfg), "--duration", "60", "--users", "20",
                         timeout=45, env={"LT_CLIENT_SECRET": "wrong-zz-secret"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("opskit loadtest: [streaming] credentials refused by the token "
                                                    f"endpoint {mock.url}/oauth/token (HTTP 401, invalid_client)")
    with urllib.request.urlopen(mock.admin_url + "/admin/counters", timeout=10) as resp:
        counts = json.loads(resp.read())
    assert counts["by_path"] == {"/oauth/token": 1}  # one fetch for all 20 users; no API call was sent
    rows = results.load(run)
    assert len(rows) <= 20 and (rows["error_type"] == "client_error").all()  # at most one per user
    written = "".join(p.read_text(errors="replace") for p in run.rglob("*") if p.is_file())
    assert "wrong-zz-secret" not in written + proc.stdout + proc.stderr
    assert "Traceback (most recent call last)" not in written + proc.stderr


def test_sigterm_stops_the_run_and_every_helper(tmp_path):
    """A CI timeout's SIGTERM ends the run with 143 and leaves no mock or exporter behind."""
    import signal
    import time

    from conftest import wait_for_file

    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSKIT_")}
    out = tmp_path / "reports"
    proc = subprocess.Popen([sys.executable, "-m", "opskit", "loadtest", "qps", "--duration", "60", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not list(out.glob("*/exporter-ready.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        run = next(out.glob("*/"))
        pids = [wait_for_file(run / f"{name}-ready.json", proc)["pid"] for name in ("mock", "exporter")]
        time.sleep(1)  # Locust is starting or running
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err.decode()
    assert err.decode().strip().endswith("opskit loadtest: terminated; stopping the mock, the exporter and Locust")
    assert "Traceback" not in err.decode()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        with open(f"/proc/{pid}/stat") as f:  # gone, or at worst a zombie awaiting its reaper
            assert f.read().split(") ")[1][0] == "Z", f"helper {pid} outlived the run"


def test_sigterm_while_the_helpers_start_leaves_none_running(tmp_path):
    """SIGTERM while the exporter starts (the mock is up): both were local to the start-up code, which
    had not yet handed them to anything that would stop them, so both outlived the run."""
    import signal
    import time

    from conftest import kill_leftovers, running_under

    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSKIT_")}
    out = tmp_path / "reports"
    proc = subprocess.Popen([sys.executable, "-m", "opskit", "loadtest", "qps", "--duration", "60", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not list(out.glob("*/mock-ready.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(out.glob("*/mock-ready.json")), "the mock did not start"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143 and "Traceback" not in err.decode(), err.decode()
        assert running_under(out) == [], "a helper outlived the interrupted run"
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_leftovers(out)


def test_a_users_own_scenario_dir_replaces_the_shipped_one(tmp_path):
    from opskit.shipped import folder

    mine = tmp_path / "scenarios"
    mine.mkdir()
    # an edited copy of the shipped scenario: its users write a marker file, so the run proves it was used
    text = (folder("loadtests") / "qps.py").read_text()
    (mine / "qps.py").write_text(text + "\nimport pathlib\npathlib.Path(__file__).with_name('used').touch()\n")
    proc, _ = loadtest(tmp_path, "qps", "--duration", "3", "--no-proxy", "--scenario-dir", str(mine))
    assert proc.returncode == 0 and "VERDICT: PASS" in proc.stdout, proc.stdout + proc.stderr
    assert (mine / "used").exists()
    proc, _ = loadtest(tmp_path, "streaming", "--duration", "1", "--no-proxy", "--scenario-dir", str(mine))
    assert proc.returncode == 2 and f"no streaming.py in {mine}; have: qps" in proc.stderr


def test_engine_metrics_sampled_beside_the_client(tmp_path):
    proc, run = loadtest(tmp_path, "streaming", "--duration", "4", "--users", "8", "--engine-metrics", "mock")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    engine = summary["scenarios"]["streaming"]["engine"]
    assert engine["engine"] == "vllm" and engine["samples"] >= 3 and not engine["errors"]
    assert engine["max_running"] >= 1 and engine["server_ttft_mean_s"] > 0 and engine["queue_time_mean_s"] >= 0
    # the server's own TTFT is part of what the client saw
    assert engine["server_ttft_mean_s"] <= summary["scenarios"]["streaming"]["ttft_s"]["p99"]
    page = (run / "report.html").read_text()
    assert "server side (vllm /metrics" in page and "<figcaption>Did requests queue in the engine (vllm)?" in page
    assert "<figcaption>Did the KV cache fill up as client TTFT rose?" in page
    # a dead endpoint is a note and a counted error, never a crash or a failed gate
    (tmp_path / "dead").mkdir()
    proc, run = loadtest(tmp_path / "dead", "qps", "--duration", "2", "--engine-metrics", "http://127.0.0.1:9/metrics")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["scenarios"]["qps"]["engine"]["samples"] == 0 and summary["scenarios"]["qps"]["engine"]["errors"]
    assert any("engine metrics http://127.0.0.1:9/metrics" in n for n in summary["notes"])
    res = subprocess.run([sys.executable, "-m", "opskit", "loadtest", "--target", "http://127.0.0.1:9",
                          "--engine-metrics", "mock"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "needs the embedded mock" in res.stderr
