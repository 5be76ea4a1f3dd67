"""The local stack: generated configs (pure), the webhook receiver and process supervision (real
processes), and `opskit stack up/status/down` against real Prometheus and Alertmanager binaries."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from opskit.core import processes
from opskit.live import stack_config
from opskit.live.alert_receiver import read_notifications, summary
from opskit.live.stack import Stack, StackError, StackSpec, query, up
from opskit.live.stack import down as stack_down
from opskit.live.stack_config import DRILL_TIMING, Timing
from tests.conftest import ROOT, kill_leftovers, need_binary, running_under, stop, wait_for_file

# ---------------------------------------------------------------- generated configs (no I/O)


def test_prometheus_yml_scrapes_exporter_and_sends_to_alertmanager():
    text = stack_config.prometheus_yml("http://127.0.0.1:9464", "http://127.0.0.1:9093", ["/s/rules/a.rules.yml"],
                                    DRILL_TIMING)
    cfg = yaml.safe_load(text)
    assert cfg["global"] == {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    job = cfg["scrape_configs"][0]
    assert job["job_name"] == "opskit" and job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9464"]}]
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    assert cfg["rule_files"] == ["/s/rules/a.rules.yml"]
    assert len(cfg["scrape_configs"]) == 1  # no engine: the exporter alone


def test_prometheus_yml_scrapes_the_mock_playing_an_engine_as_job_llm_engine():
    cfg = yaml.safe_load(stack_config.prometheus_yml("http://127.0.0.1:9464", "http://127.0.0.1:9093", [],
                                                     DRILL_TIMING, engine_url="http://127.0.0.1:8000"))
    engine = cfg["scrape_configs"][1]
    assert engine == {"job_name": "llm-engine", "metrics_path": "/metrics",
                      "static_configs": [{"targets": ["127.0.0.1:8000"]}]}


def test_prometheus_yml_keeps_a_metrics_path_given_in_the_url():
    cfg = yaml.safe_load(stack_config.prometheus_yml("http://127.0.0.1:1/x/metrics", "http://127.0.0.1:2", [],
                                                  Timing()))
    assert cfg["scrape_configs"][0]["metrics_path"] == "/x/metrics"


def test_host_port_rejects_a_url_without_port():
    with pytest.raises(ValueError, match="HOST:PORT"):
        stack_config.host_port("http://example.com/metrics")


def test_alertmanager_yml_routes_everything_to_the_webhook_with_resolved():
    cfg = yaml.safe_load(stack_config.alertmanager_yml("http://127.0.0.1:5/alerts", DRILL_TIMING))
    assert cfg["route"]["receiver"] == stack_config.RECEIVER_NAME
    assert cfg["route"]["group_wait"] == "1s" and cfg["route"]["group_interval"] == "1s"
    hook = cfg["receivers"][0]["webhook_configs"][0]
    assert hook == {"url": "http://127.0.0.1:5/alerts", "send_resolved": True}


def test_retime_alertmanager_keeps_the_tree_and_replaces_every_receiver():
    project = {
        "route": {"receiver": "default", "group_by": ["alertname"], "group_wait": "30s",
                  "routes": [{"matchers": ['severity="critical"'], "receiver": "pager", "group_wait": "10s"}]},
        "receivers": [{"name": "default", "email_configs": [{"to": "x@example.com"}]},
                      {"name": "pager", "webhook_configs": [{"url": "https://pager.example.com/hook"}]}],
        "inhibit_rules": [{"source_matchers": ['severity="critical"'], "target_matchers": ['severity="warning"'],
                           "equal": ["target"]}],
    }
    cfg = yaml.safe_load(stack_config.retime_alertmanager(yaml.safe_dump(project), "http://127.0.0.1:7/a", DRILL_TIMING))
    assert cfg["route"]["group_wait"] == "1s" and cfg["route"]["repeat_interval"] == "1h"
    assert cfg["route"]["routes"][0]["group_wait"] == "1s"
    assert cfg["route"]["routes"][0]["receiver"] == "pager"
    assert [r["name"] for r in cfg["receivers"]] == ["default", "pager"]
    for r in cfg["receivers"]:
        assert r == {"name": r["name"], "webhook_configs": [{"url": "http://127.0.0.1:7/a", "send_resolved": True}]}
    assert cfg["inhibit_rules"] == project["inhibit_rules"]


def test_timing_check_names_the_bad_field():
    with pytest.raises(ValueError, match="scrape_interval"):
        Timing(scrape_interval="fast").check()
    Timing().check()
    DRILL_TIMING.check()


# ---------------------------------------------------------------- receiver (real HTTP)


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_receiver_appends_each_notification_and_rejects_garbage(tmp_path):
    out, ready = tmp_path / "n.jsonl", tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "opskit.live.alert_receiver", "--out", str(out), "--ready-file", str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        url = wait_for_file(ready, proc)["url"]
        payload = {"receiver": "r", "status": "firing", "alerts": [
            {"status": "firing", "labels": {"alertname": "LLMHighErrorRate", "target": "mock"}}]}
        assert _post(url + "/alerts", json.dumps(payload).encode()) == 200
        assert _post(url + "/alerts", b"not json") == 400
        assert _post(url + "/alerts", b"[1, 2]") == 400
        got = read_notifications(out)
        assert len(got) == 1
        assert got[0]["alerts"] == payload["alerts"] and got[0]["received_at"] > 0
        with urllib.request.urlopen(url + "/stats", timeout=5) as resp:
            assert json.loads(resp.read()) == {"received": 1, "rejected": 2}
    finally:
        stop(proc)
    assert "firing LLMHighErrorRate{target=mock}" in proc.stdout.read().decode()


def test_receiver_bad_listen_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "opskit.live.alert_receiver", "--out", str(tmp_path / "x"), "--listen", "nope"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--listen" in r.stderr


def test_receiver_unwritable_ready_file_is_named(tmp_path):
    ready = tmp_path / "missing-dir" / "rx.json"
    r = subprocess.run([sys.executable, "-m", "opskit.live.alert_receiver", "--out", str(tmp_path / "x"), "--ready-file",
                        str(ready)], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 1
    assert r.stderr.strip() == f"receiver: cannot write the ready file {ready}: No such file or directory"


def test_read_notifications_skips_a_half_written_last_line(tmp_path):
    f = tmp_path / "n.jsonl"
    f.write_text('{"status": "firing", "alerts": []}\n{"status": "res')
    assert read_notifications(f) == [{"status": "firing", "alerts": []}]
    assert read_notifications(tmp_path / "missing") == []


def test_summary_lists_alerts_with_labels():
    line = summary({"receiver": "w", "status": "resolved", "alerts": [
        {"status": "resolved", "labels": {"alertname": "A", "b": "2", "a": "1"}}]})
    assert line == "[w] resolved: resolved A{a=1,b=2}"


# ---------------------------------------------------------------- supervision (real processes)


def test_stop_kills_the_whole_process_group(tmp_path):
    # The child forks a grandchild that ignores SIGTERM: stop() must still leave nothing behind.
    script = ("import os, signal, subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
              "open(sys.argv[1], 'w').write(str(p.pid))\n"
              "time.sleep(60)\n")
    pidfile = tmp_path / "grandchild"
    child, proc = processes.spawn("t", [sys.executable, "-c", script, str(pidfile)], tmp_path / "t.log")
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    assert processes.alive(child) and processes.proc_start_time(grandchild) is not None
    assert processes.stop(child, timeout=1.0) is True
    proc.wait(timeout=5)
    deadline = time.monotonic() + 5
    while processes.proc_start_time(grandchild) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes.proc_start_time(grandchild) is None
    assert processes.stop(child) is False


def test_a_recycled_pid_is_not_ours(tmp_path):
    child, proc = processes.spawn("t", [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "t.log")
    try:
        impostor = processes.Child("t", child.pid, child.start_time + 1, child.log)
        assert processes.alive(child) and not processes.alive(impostor)
        assert processes.stop(impostor) is False and proc.poll() is None
    finally:
        processes.stop(child)
        proc.wait(timeout=5)


def test_wait_ready_file_reports_an_early_death_with_the_log(tmp_path):
    child, proc = processes.spawn("bad", [sys.executable, "-c", "import sys; print('boom here'); sys.exit(3)"],
                                  tmp_path / "bad.log")
    with pytest.raises(processes.SuperviseError, match="bad exited with status 3 .*boom here"):
        processes.wait_ready_file(child, proc, tmp_path / "never.json", timeout=10)


def test_spawn_of_a_missing_binary_is_one_line(tmp_path):
    with pytest.raises(processes.SuperviseError, match="cannot run /nonexistent/bin"):
        processes.spawn("x", ["/nonexistent/bin"], tmp_path / "x.log")


def test_cli_status_and_down_without_a_stack(tmp_path):
    from opskit.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["stack", "status", "--state-dir", str(tmp_path)])
    assert r.exit_code == 1 and "stack is down" in r.output
    r = runner.invoke(main, ["stack", "down", "--state-dir", str(tmp_path)])
    assert r.exit_code == 0 and "nothing running" in r.output


def test_cli_damaged_state_file_is_one_line(tmp_path):
    from opskit.cli import main

    (tmp_path / "state.json").write_text("{not json")
    r = CliRunner().invoke(main, ["stack", "status", "--state-dir", str(tmp_path)])
    assert r.exit_code == 1 and "damaged" in r.output and "Traceback" not in r.output



# ---------------------------------------------------------------- the whole stack (real binaries)


def _pids(state_dir) -> list[processes.Child]:
    data = json.loads((state_dir / "state.json").read_text())
    return [processes.Child(**{k: v for k, v in c.items() if k != "urls"}) for c in data["components"]]


@pytest.mark.slow
def test_stack_up_status_down_leaves_nothing_running(tmp_path, monkeypatch):
    from opskit.cli import main

    need_binary("prometheus")
    need_binary("prometheus-alertmanager")
    state = tmp_path / "stack"
    runner = CliRunner()
    r = runner.invoke(main, ["stack", "up", "--state-dir", str(state), "--gpu", "fake", "--scrape-interval", "1s"])
    try:
        assert r.exit_code == 0, r.output
        children = _pids(state)
        assert [c.name for c in children] == ["receiver", "mock", "exporter", "alertmanager", "prometheus"]
        assert all(processes.alive(c) for c in children)
        stack = Stack.load(state)
        prom = stack.url("prometheus")
        # Prometheus scrapes the exporter, which reads the fake GPU through pynvml and loads the rules.
        gpu = query(prom, "opskit_gpu_utilization_ratio")
        assert gpu and gpu[0]["metric"]["job"] == "opskit" and float(gpu[0]["value"][1]) == pytest.approx(0.2)
        with urllib.request.urlopen(prom + "/api/v1/rules", timeout=5) as resp:
            names = {ru["name"] for g in json.loads(resp.read())["data"]["groups"] for ru in g["rules"]}
        assert {"LLMHighErrorRate", "GPUHighUtilization"} <= names
        assert processes.http_ok(stack.url("alertmanager") + "/-/ready")
        # ready-to-paste settings: the proxy URL is the API root, and the UI links are the ones served
        proxy = stack.url("exporter", "proxy_url")
        assert f"export OPENAI_BASE_URL={proxy}\n" in r.output and f"{stack.url('exporter')}/metrics" in r.output
        links = re.findall(r"http://127\.0\.0\.1:\d+/\S*alerts", r.output)
        assert len(links) == 2 and all(processes.http_ok(u) for u in links), links
        req = urllib.request.Request(proxy + "/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                     data=b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}')
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        r = runner.invoke(main, ["stack", "status", "--state-dir", str(state)])
        assert r.exit_code == 0 and r.output.count("running") == 5 and prom in r.output
        monkeypatch.chdir(tmp_path)  # no .stack here: the last `up`'s state dir is used, and named
        r = runner.invoke(main, ["stack", "status"])
        assert r.exit_code == 0 and r.output.count("running") == 5 and f"--state-dir {state}" in r.output
        r = runner.invoke(main, ["stack", "up", "--state-dir", str(state)])
        assert r.exit_code == 0 and "already up" in r.output
        assert [c.pid for c in _pids(state)] == [c.pid for c in children]  # nothing new started
    finally:
        r = runner.invoke(main, ["stack", "down", "--state-dir", str(state)])
    assert r.exit_code == 0 and "stopped: prometheus, alertmanager, exporter, mock, receiver" in r.output
    assert not any(processes.alive(c) for c in children)
    r = runner.invoke(main, ["stack", "status", "--state-dir", str(state)])
    assert r.exit_code == 1 and "down" in r.output


@pytest.mark.slow
def test_a_component_failing_at_start_stops_the_others(tmp_path):
    need_binary("prometheus")
    need_binary("prometheus-alertmanager")
    bad = {"bad.rules.yml": "groups:\n- name: x\n  rules:\n  - alert: A\n    expr: 'sum(('\n"}
    spec = StackSpec(state_dir=tmp_path, rules=bad, gpu="off", ready_timeout_s=30)
    with pytest.raises(StackError, match="prometheus exited") as err:
        up(spec)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "state.json").exists()
    # Every process it had started (by the pids in their logs' ready files) is gone.
    for name in ("receiver", "mock", "exporter"):
        pid = json.loads((tmp_path / f"{name}.ready.json").read_text())["pid"]
        assert processes.proc_start_time(pid) is None, name


def test_missing_binary_is_one_line_and_starts_nothing(tmp_path, monkeypatch):
    from opskit.cli import main

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = CliRunner().invoke(main, ["stack", "up", "--state-dir", str(tmp_path / "s")])
    assert r.exit_code == 1
    assert "prometheus not found on PATH" in r.output and r.output.strip().count("\n") == 0
    assert not (tmp_path / "s" / "state.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--gpu", "maybe"], "Invalid value for '--gpu'"),
    (["--scrape-interval", "soon"],
     "Error: Invalid value for '--scrape-interval': expected a duration such as 1s or 5m, got 'soon'"),
    (["--target", "ftp://x"], "config error"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    from opskit.cli import main

    r = CliRunner().invoke(main, ["stack", "up", "--state-dir", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "state.json").exists()


@pytest.mark.slow
def test_stack_against_a_configured_target_starts_no_mock(tmp_path, mock_server, monkeypatch):
    # A "real" target (here a separately started mock): the exporter proxies and probes it. The state
    # dir and config are given relative to the caller's directory, as `opskit stack up` does by default
    # (.stack), though the components run elsewhere.
    need_binary("prometheus")
    need_binary("prometheus-alertmanager")
    monkeypatch.chdir(tmp_path)
    Path("opskit.yaml").write_text(f'targets: [{{name: real, base_url: "{mock_server.api}"}}]\n')
    st = up(StackSpec(state_dir=Path("st"), config="opskit.yaml", gpu="off"))
    try:
        assert [c.child.name for c in st.components] == ["receiver", "exporter", "alertmanager", "prometheus"]
        body = json.dumps({"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 4}).encode()
        req = urllib.request.Request(st.url("exporter", "proxy_url") + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(st.url("exporter") + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        from prometheus_client.parser import text_string_to_metric_families

        samples = [s for f in text_string_to_metric_families(metrics) for s in f.samples
                   if s.name == "opskit_llm_requests_total"]
        assert [(s.labels["source"], s.labels["target"], s.labels["code"], s.value) for s in samples
                if s.labels["source"] == "proxy"] == [("proxy", "real", "200", 1.0)]
    finally:
        stopped = stack_down(Path("st"))
    assert stopped == ["prometheus", "alertmanager", "exporter", "receiver"]


def test_stale_state_is_not_running_and_status_names_the_dead(tmp_path):
    from opskit.cli import main
    from opskit.live.stack import Component, running

    live, proc = processes.spawn("live", [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "l.log")
    try:
        dead = processes.Child("dead", live.pid, live.start_time + 7, str(tmp_path / "d.log"))  # a recycled pid
        Stack(tmp_path, [Component(dead, {"url": "http://127.0.0.1:1"})], {}).save()
        assert running(tmp_path) is None  # `up` would start afresh
        Stack(tmp_path, [Component(live, {"url": "http://127.0.0.1:2"}), Component(dead, {})], {}).save()
        assert running(tmp_path) is not None  # `up` would say it is already up
        r = CliRunner().invoke(main, ["stack", "status", "--state-dir", str(tmp_path)])
        assert r.exit_code == 1
        assert re.search(r"live\s+running", r.output) and re.search(r"dead\s+DOWN", r.output)
        # a second `up` on a partly dead stack starts nothing, and says so with exit 1 rather than "already up"
        r = CliRunner().invoke(main, ["stack", "up", "--state-dir", str(tmp_path)])
        assert r.exit_code == 1 and re.search(r"dead\s+DOWN", r.output)
        assert r.output.strip().splitlines()[-1] == (f"Error: stack partly down (state dir {tmp_path}): "
                                                     "`opskit stack down`, then `opskit stack up`, restarts it")
    finally:
        processes.stop(live)
        proc.wait(timeout=5)


@pytest.mark.slow
def test_sigterm_during_up_stops_what_was_started(tmp_path):
    need_binary("prometheus")
    need_binary("prometheus-alertmanager")
    state_dir = tmp_path / "st"
    proc = subprocess.Popen([sys.executable, "-m", "opskit", "stack", "up", "--state-dir", str(state_dir),
                             "--gpu", "off"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # the first component is ready: `up` is starting the mock when SIGTERM comes
        pid = wait_for_file(state_dir / "receiver.ready.json", proc, timeout=30)["pid"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 143 and b"Traceback" not in err, err.decode()
        assert not (state_dir / "state.json").exists()
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(") ")[1][0] == "Z", "the receiver outlived stack up"
        assert running_under(state_dir) == [], "a component outlived the interrupted stack up"
    finally:
        stop(proc)
        kill_leftovers(state_dir)


def test_sigterm_between_starting_a_component_and_recording_it_leaks_nothing(tmp_path, monkeypatch):
    # The race of the test above, made certain: SIGTERM arrives the instant the mock's process exists,
    # before `up` has recorded it. The mock runs in its own session, so one not recorded outlived `up`.
    from opskit.core.cli_helpers import sigterm_unwinds

    need_binary("prometheus")
    need_binary("prometheus-alertmanager")
    real_spawn = processes.spawn
    spawned = []

    def spawn_then_sigterm(name, argv, *args, **kw):
        child, proc = real_spawn(name, argv, *args, **kw)
        spawned.append((child, proc))
        if name == "mock":
            signal.raise_signal(signal.SIGTERM)
        return child, proc

    monkeypatch.setattr(processes, "spawn", spawn_then_sigterm)
    state_dir = tmp_path / "st"
    try:
        with pytest.raises(SystemExit) as exc, sigterm_unwinds():
            up(StackSpec(state_dir=state_dir, gpu="off", ready_timeout_s=30))
        assert exc.value.code == 143
        assert [c.name for c, _ in spawned] == ["receiver", "mock"]
        assert [p.poll() is not None for _, p in spawned] == [True, True]  # both stopped, by pid
        assert running_under(state_dir) == []
    finally:
        for child, proc in spawned:
            processes.stop(child)
            proc.wait(timeout=10)
