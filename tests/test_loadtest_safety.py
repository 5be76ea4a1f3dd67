"""A safe first hour (issue 16): a wrong target fails before any load, and a failing one stops the run.

Each case runs `opskit loadtest` as a user does (a subprocess) against 127.0.0.1 only, and counts what
reached the mock through its admin counters.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from opskit.loadtest.breaker import Breaker
from opskit.loadtest.canary import explain
from tests.test_loadtest_gate import loadtest

pytestmark = pytest.mark.slow


def _counters(mock) -> dict:
    with urllib.request.urlopen(mock.admin_url + "/admin/counters", timeout=10) as resp:
        return json.loads(resp.read())


def _sent(mock) -> int:
    return sum(_counters(mock)["requests"].values())


def test_nothing_listening_ends_in_seconds_with_exit_2(tmp_path):
    # it ran 75 s and sent ~44,000 requests through the proxy's 502s
    proc, _ = loadtest(tmp_path, "--target", "http://127.0.0.1:1", "--duration", "60", timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("opskit loadtest: canary call failed, no load sent: cannot reach http://127.0.0.1:1/chat/completions"
                    ": connection refused (nothing listening there?)")
    assert "Traceback" not in proc.stderr


def test_wrong_key_and_path_typo_send_one_request_each(tmp_path, start_mock):
    mock = start_mock("--auth", "bearer", "--api-key", "sk-right-one")
    proc, _ = loadtest(tmp_path / "key", "qps", "--target", mock.url, "--duration", "60", timeout=30,
                       env={"OPSKIT_API_KEY": "sk-wrong-zz-key"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"canary call failed, no load sent: HTTP 401 from {mock.url}/chat/completions: credentials refused "
            "(auth scheme bearer") in proc.stderr
    assert "sk-wrong-zz-key" not in proc.stdout + proc.stderr
    assert _sent(mock) == 1

    proc, _ = loadtest(tmp_path / "path", "qps", "--target", mock.url + "/v2", "--duration", "60", timeout=30,
                       env={"OPSKIT_API_KEY": "sk-right-one"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"HTTP 404 for POST {mock.url}/v2/chat/completions: no such path" in proc.stderr
    proc, _ = loadtest(tmp_path / "model", "qps", "--target", mock.url, "--model", "nosuch-model", "--duration", "60",
                       timeout=30, env={"OPSKIT_API_KEY": "sk-right-one"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown model 'nosuch-model'" in proc.stderr
    assert _counters(mock)["requests"] == {"401": 1, "404": 1, "400": 1}


def test_half_the_calls_failing_opens_the_circuit(tmp_path):
    proc, run = loadtest(tmp_path, "qps", "streaming", "--duration", "30", "--mock-args", "--error-rate 500=0.5 --seed 2",
                         timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    verdict = proc.stdout.splitlines()[-2]
    assert verdict.startswith("VERDICT: FAIL ([qps] stopped: circuit open after ") and "server_error" in verdict
    assert "not run after the circuit opened: streaming" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    checks = {c["name"]: c for c in summary["checks"]}
    assert not checks["circuit_breaker"]["passed"] and checks["circuit_breaker"]["value"] > 0.3
    assert checks["proxy_reconciled"]["passed"], checks["proxy_reconciled"]["note"]  # stopped cleanly
    assert summary["scenarios"]["qps"]["requests"] < 20 * 30 / 2  # well before the end of the run
    assert set(summary["scenarios"]) == {"qps"}


@pytest.mark.parametrize(("errors", "opens"), [(10, True), (3, False)])
def test_breaker_needs_confidence_and_ignores_expected_429s(errors, opens):
    class T:
        circuit_error_ratio, circuit_window_s, circuit_min_requests = 0.15, 10.0, 20

    b = Breaker.for_scenario("qps", T)
    assert (b.observe(2.0, 20, {"server_error": errors}) is not None) is opens
    throttling = Breaker.for_scenario("throttling", T)
    assert throttling.observe(2.0, 40, {"rate_limited": 30}) is None
    opened = throttling.observe(3.0, 80, {"rate_limited": 30, "connection": 30})
    assert opened and opened[0].startswith("stopped: circuit open after 3 s, 38 % errors (connection 30)")


def test_canary_passes_when_the_target_answered():
    for row in ({"status": 200, "error_type": ""}, {"status": 429, "error_type": "rate_limited"},
                {"status": 500, "error_type": "server_error"}):
        assert explain(row, "http://x/chat/completions", "none", "m", 30) is None
    row = {"status": 502, "error_type": "connection", "error": "HTTP 502",
           "error_body": '{"error": {"message": "upstream unreachable: connect failed: SSLCertVerificationError"}}'}
    assert "TLS handshake failed" in explain(row, "https://x/chat/completions", "bearer", "m", 30)
    row = {"status": 401, "error_type": "client_error", "error_body": '{"error": {"message": "bad key sk-abc123456789"}}'}
    assert "sk-abc123456789" not in explain(row, "https://x/chat/completions", "bearer", "m", 30)


def test_locust_csv_files_end_with_every_call(tmp_path):
    """Locust closed its CSVs with the rows of its last 1 s tick (qps 387 in the CSV, 400 in its log and
    HTML). Run in a subprocess: importing locust monkey-patches the standard library."""
    import subprocess
    import sys

    script = f"""
import csv, gevent
from opskit.loadtest import users  # noqa: F401  (patches the CSV writer's close)
import locust.stats
from locust.env import Environment
env = Environment(events=locust.events)
env.create_local_runner()
w = locust.stats.StatsCSVFileWriter(env, locust.stats.PERCENTILES_TO_REPORT, {str(tmp_path / "x")!r}, False)
g = gevent.spawn(w.stats_writer)
gevent.sleep(0.1)
for _ in range(7):  # after the writer's last tick, as the final calls of a run land
    env.events.request.fire(request_type="POST", name="qps", response_time=5.0, response_length=1, exception=None,
                            context={{}})
env.events.request.fire(request_type="POST", name="qps", response_time=5.0, response_length=1,
                        exception=users.RequestFailure("server_error (HTTP 500)"), context={{}})
g.kill()
w.close_files()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from opskit.loadtest.breaker import read_counts

    assert read_counts(tmp_path / "x") == (8, {"server_error": 1})
