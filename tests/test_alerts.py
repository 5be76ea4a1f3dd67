"""Alert rules and Alertmanager config: generated from the thresholds, only catalogue series,
complete annotations, promtool-tested on both sides of every `for:`, and routed/inhibited by a
real Alertmanager."""

from __future__ import annotations

import dataclasses
import http.server
import json
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from opskit import cli
from opskit.core import catalog, thresholds
from opskit.core.config import ConfigError
from opskit.opscode import alert_rules, routing, rules_file
from opskit.opscode.promql import series_names
from tests.conftest import need_binary, stop

ALERTS_DIR = Path(__file__).resolve().parent.parent / "alerts"
T = thresholds.Thresholds()


def _rules(text: str) -> list[dict]:
    return [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]


def _alert_rules(text: str) -> dict[str, dict]:
    return {r["alert"]: r for r in _rules(text) if "alert" in r}


def test_committed_files_are_what_the_generator_writes():
    # the built-in values are what the committed files hold; a changed threshold must be regenerated.
    for name, text in rules_file.outputs(thresholds.Thresholds()).items():
        assert (ALERTS_DIR / name).read_text() == text, f"alerts/{name} is stale: run opskit generate alerts"


def test_rules_name_only_catalogue_series_or_own_recordings():
    known = catalog.all_series() | alert_rules.recording_names()
    seen = set()
    for rule in _rules(rules_file.render_rules(T)):
        names = series_names(rule["expr"])
        assert names, f"no series found in {rule['expr']!r}"
        assert names <= known, f"{rule.get('alert') or rule['record']} names unknown series {names - known}"
        seen |= names
    # The scanner must be finding real names, not skipping everything.
    assert {"opskit_llm_requests_total", "opskit_gpu_up", "up", alert_rules.TTFT_P95} <= seen


def test_series_scanner_ignores_functions_labels_and_keywords():
    expr = ('histogram_quantile(0.9, sum by (target, le) (rate(a_bucket{x=~"b|c"}[5m]))) '
            '/ on(target) group_left(model) b_total offset 1h > bool 1e3 and c unless d{e=""}')
    assert series_names(expr) == {"a_bucket", "b_total", "c", "d"}


def test_recording_rule_names_follow_level_metric_operation():
    for name in alert_rules.recording_names():
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_thresholds_sit_on_bucket_edges():
    for field, (value, buckets) in catalog.threshold_edges(thresholds.Thresholds()).items():
        assert value in buckets, f"{field}={value} is not a bucket edge of {buckets}"


def test_every_alert_has_severity_annotations_and_a_runbook_section():
    runbook = (ALERTS_DIR / "runbook.md").read_text()
    anchors = {h.strip().lower() for h in re.findall(r"^## (.+)$", runbook, re.M)}
    alerts = _alert_rules(rules_file.render_rules(T, runbook_base="https://wiki.example/runbook"))
    assert len(alerts) >= 13
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in routing.SEVERITY_RECEIVER, name
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], name
        assert "$value" in ann["description"] or "for" in rule, name
        assert "$labels.target" in ann["description"] or "$labels.instance" in ann["description"], name
        assert ann["runbook_url"] == f"https://wiki.example/runbook#{name.lower()}"
        assert name.lower() in anchors, f"runbook.md has no section for {name}"


def test_required_alerts_and_their_thresholds():
    alerts = _alert_rules(rules_file.render_rules(T))
    assert alerts["LLMHighTimeToFirstToken"]["expr"].endswith("> 0.5")
    assert alerts["LLMHighTimeToFirstToken"]["for"] == "5m"
    assert alerts["LLMHighRequestLatency"]["expr"].endswith("> 2")
    assert alerts["LLMHighErrorRate"]["labels"]["severity"] == "warning"
    assert alerts["LLMErrorRateCritical"]["labels"]["severity"] == "critical"
    assert alerts["LLMErrorRateCritical"]["for"] == "2m"
    assert alerts["GPUHighUtilization"]["expr"].endswith("> 0.9")
    assert "opskit_llm_quota_limit_requests" in alerts["LLMQuotaNearlyExhausted"]["expr"]
    # 99% SLO: budget 1%, so 14.4x is 0.144.
    assert "> 0.144" in alerts["LLMErrorBudgetFastBurn"]["expr"]


GUARDED = ("LLMHighErrorRate", "LLMErrorRateCritical", "LLMRateLimited")


def test_ratio_alerts_need_min_request_rate_and_burn_alerts_do_not():
    alerts = _alert_rules(rules_file.render_rules(T))
    guard = f" and on (target) {alert_rules.REQUESTS_RATE} > {alert_rules.num(T.min_request_rate)}"
    for name in GUARDED:
        # The ratio stays on the left of `and`, so $value in the description is still the ratio.
        assert alerts[name]["expr"].endswith(guard), name
        assert alerts[name]["expr"].startswith(("target:opskit_llm_errors:", "target:opskit_llm_ratelimited:"))
    # Their long windows need many failed canaries, and a quiet target's steady failures must
    # still reach someone: the burn alerts read the SLO ratios alone.
    for name in ("LLMErrorBudgetFastBurn", "LLMErrorBudgetSlowBurn"):
        assert alert_rules.REQUESTS_RATE not in alerts[name]["expr"], name


def test_min_request_rate_is_overridable(tmp_path, clean_env):
    override = tmp_path / "t.yaml"
    override.write_text("min_request_rate: 1\n")
    t = thresholds.load(override)
    assert t.min_request_rate == 1
    alerts = _alert_rules(rules_file.render_rules(t))
    assert all(alerts[n]["expr"].endswith(f"{alert_rules.REQUESTS_RATE} > 1") for n in GUARDED)
    override.write_text("min_request_rate: often\n")
    with pytest.raises(ConfigError, match="min_request_rate: expected a number"):
        thresholds.load(override)


def _probe_only_rates() -> dict[str, float]:
    """Deployment name -> probe calls per second its exporters make to one target with no other
    traffic: replicas x 1 / probe interval, from each manifest's Deployment and its ConfigMap."""
    deploy = ALERTS_DIR.parent / "deploy"
    docs = [d for f in sorted(deploy.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    configs = {d["metadata"]["name"]: yaml.safe_load(d["data"]["opskit.yaml"])
               for d in docs if d["kind"] == "ConfigMap" and "opskit.yaml" in d.get("data", {})}
    out = {}
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        if not any("--probe" in c.get("args", []) for c in pod["containers"]):
            continue
        names = [v.get("configMap", {}).get("name") for v in pod.get("volumes", [])]
        cm = next(n for n in names if n in configs)
        interval = configs[cm].get("probe", {}).get("interval_s", 60)
        out[d["metadata"]["name"]] = d["spec"].get("replicas", 1) / interval
    return out


def test_probe_only_traffic_of_the_shipped_deployments_stays_under_the_guard():
    rates = _probe_only_rates()
    assert set(rates) >= {"llm-server", "chat-app"}, rates
    for name, rate in rates.items():
        # A margin: probes are not evenly spread, and rate() extrapolates at a window's edges.
        assert rate * 1.2 < T.min_request_rate, f"{name}: probe-only traffic {rate:.3f}/s would pass the guard"


def _promtool_tests() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((ALERTS_DIR / "tests").glob("*.yml"))]


def test_every_alert_is_promtool_tested_on_both_sides_of_for():
    quiet, fired = {}, {}
    for doc in _promtool_tests():
        for case in doc["tests"]:
            for t in case.get("alert_rule_test", []):
                bucket = fired if t.get("exp_alerts") else quiet
                bucket.setdefault(t["alertname"], []).append(t["eval_time"])
    for name, rule in _alert_rules(rules_file.render_rules(T)).items():
        assert name in fired, f"no promtool test sees {name} fire"
        assert name in quiet, f"no promtool test checks {name} stays quiet"
        if "for" in rule:
            # Some quiet check must sit one evaluation step (1m) before a firing check.
            before = {_minutes(f) - 1 for f in fired[name]}
            assert before & {_minutes(q) for q in quiet[name]}, f"{name}: no check one step before firing"


def _minutes(duration: str) -> int:
    value, unit = int(duration[:-1]), duration[-1]
    return value * {"m": 1, "h": 60}[unit]


def test_promtool_tests_fix_the_group_order():
    # Each file lists the groups it exercises in the generator's order (a file may leave out groups
    # added later that its alerts do not read, e.g. the GPU health groups in the LLM files).
    for doc in _promtool_tests():
        source = "dcgm" if any("dcgm/" in f for f in doc["rule_files"]) else "nvml"
        groups = [g.name for g in alert_rules.groups(T, source=source)]
        order = doc["group_eval_order"]
        assert order == [g for g in groups if g in order] and set(order) <= set(groups), order
        assert order[0] == groups[0], "recordings first"


def test_short_for_replaces_every_for_and_is_valid_for_promtool(tmp_path):
    text = rules_file.render_rules(T, short_for="30s", eval_interval="5s", exporter_job="drill-exporter")
    alerts = _alert_rules(text)
    assert {r["for"] for r in alerts.values() if "for" in r} == {"30s"}
    assert 'up{job=~"drill-exporter"}' in alerts["OpskitExporterDown"]["expr"]
    assert all(g["interval"] == "5s" for g in yaml.safe_load(text)["groups"])
    path = tmp_path / "drill.rules.yml"
    path.write_text(text)
    proc = subprocess.run([need_binary("promtool"), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kw", [{"short_for": "soon"}, {"eval_interval": "5"}])
def test_bad_durations_are_rejected(kw):
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        rules_file.render_rules(T, **kw)


def test_cli_writes_checks_and_reports_staleness(tmp_path, clean_env):
    runner = CliRunner()
    res = runner.invoke(cli.main, ["generate", "alerts", "--out-dir", str(tmp_path), "--check"])
    assert res.exit_code == 1 and "out of date" in res.output
    res = runner.invoke(cli.main, ["generate", "alerts", "--out-dir", str(tmp_path), "--receiver-url", "http://127.0.0.1:9/hook"])
    assert res.exit_code == 0, res.output
    am = yaml.safe_load((tmp_path / "alertmanager.yml").read_text())
    assert {c["url"] for r in am["receivers"] for c in r["webhook_configs"]} == {"http://127.0.0.1:9/hook"}
    res = runner.invoke(cli.main, ["generate", "alerts", "--out-dir", str(tmp_path), "--check", "--receiver-url",
                                        "http://127.0.0.1:9/hook"])
    assert res.exit_code == 0, res.output


def test_cli_errors_are_one_line_with_exit_2(tmp_path, clean_env):
    runner = CliRunner()
    bad = tmp_path / "t.yaml"
    bad.write_text("ttft_p95_seconds: fast\n")
    res = runner.invoke(cli.main, ["generate", "alerts", "--out-dir", str(tmp_path), "--thresholds", str(bad)])
    assert res.exit_code == 2 and "ttft_p95_seconds" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli.main, ["generate", "alerts", "--out-dir", str(tmp_path), "--short-for", "quick"])
    assert res.exit_code == 2 and "not a Prometheus duration" in res.output
    res = runner.invoke(cli.main, ["generate", "alerts", "--out-dir", str(tmp_path), "--pager-url", "ftp://x"])
    assert res.exit_code == 2 and "pager receiver URL" in res.output


def test_threshold_override_file_changes_the_rules(tmp_path, clean_env):
    override = tmp_path / "t.yaml"
    override.write_text("ttft_p95_seconds: 0.75\nerror_ratio: 0.05\nerror_for: 7m\n")
    alerts = _alert_rules(rules_file.render_rules(thresholds.load(override)))
    assert alerts["LLMHighTimeToFirstToken"]["expr"].endswith("> 0.75")
    assert "750ms" in alerts["LLMHighTimeToFirstToken"]["annotations"]["description"]
    assert alerts["LLMHighErrorRate"]["expr"].startswith(f"{alert_rules.ERRORS_RATIO} > 0.05 and")
    assert alerts["LLMHighErrorRate"]["for"] == "7m"
    slo = dataclasses.replace(T, availability_slo=0.999)
    assert "> 0.0144" in _alert_rules(rules_file.render_rules(slo))["LLMErrorBudgetFastBurn"]["expr"]


def test_alertmanager_config_with_custom_urls_passes_amtool(tmp_path):
    urls = {"pager": "https://pager.example/hook", "chat": "http://127.0.0.1:8080/chat"}
    path = tmp_path / "am.yml"
    path.write_text(rules_file.render_alertmanager(urls=urls, group_wait="1s"))
    amtool = need_binary("amtool")
    proc = subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([amtool, "config", "routes", "test", f"--config.file={path}",
                           "--verify.receivers=pager", "severity=critical", "target=api"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with pytest.raises(ValueError, match="unknown receiver"):
        routing.config(urls={"sms": "http://x"})


# --- a real Alertmanager: routing by severity and inhibition while an exporter is down ---------

class _Hook(http.server.BaseHTTPRequestHandler):
    """Webhook receiver: records (path, alertnames+labels) of every notification."""

    received: list[tuple[str, dict]] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        for alert in body["alerts"]:
            self.received.append((self.path, alert["labels"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # keep pytest output clean
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read() or b"null")


@pytest.fixture
def webhook():
    _Hook.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Hook.received
    server.shutdown()
    server.server_close()


@pytest.fixture
def alertmanager_url(tmp_path, webhook):
    binary = need_binary("prometheus-alertmanager")
    base, _ = webhook
    config = tmp_path / "alertmanager.yml"
    config.write_text(rules_file.render_alertmanager(
        urls={name: f"{base}/{name}" for name in routing.RECEIVERS}, group_wait="1s", group_interval="1s"))
    port = _free_port()
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                pytest.fail(f"alertmanager did not start: {proc.stderr.read().decode()[-1000:]}")
            time.sleep(0.1)
    yield url
    stop(proc)


def _alert(name: str, severity: str, **labels) -> dict:
    return {"labels": {"alertname": name, "severity": severity, **labels},
            "annotations": {"summary": name}, "generatorURL": "http://127.0.0.1/test"}


@pytest.mark.slow
def test_alertmanager_routes_by_severity_and_inhibits(alertmanager_url, webhook):
    _, received = webhook
    alerts = [
        _alert("LLMErrorRateCritical", "critical", target="api"),
        _alert("LLMHighErrorRate", "warning", target="api"),           # muted by its critical twin
        _alert("LLMHighTimeToFirstToken", "warning", target="api"),    # no instance: never muted by a down exporter
        _alert("OpskitExporterDown", "warning", instance="node1:9464", job="opskit"),
        _alert("GPUHighUtilization", "warning", instance="node1:9464", gpu="0"),   # muted: its exporter is down
        _alert("GPUHighUtilization", "warning", instance="node2:9464", gpu="0"),   # other instance: delivered
        _alert("LLMErrorBudgetSlowBurn", "ticket", target="api", slo="availability"),
    ]
    req = urllib.request.Request(f"{alertmanager_url}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=5).close()
    expected = {
        ("/pager", "LLMErrorRateCritical", None), ("/chat", "LLMHighTimeToFirstToken", None),
        ("/chat", "OpskitExporterDown", "node1:9464"), ("/chat", "GPUHighUtilization", "node2:9464"),
        ("/ticket", "LLMErrorBudgetSlowBurn", None),
    }
    deadline = time.monotonic() + 20
    got: set = set()
    while time.monotonic() < deadline and got != expected:
        got = {(path, labels["alertname"], labels.get("instance")) for path, labels in list(received)}
        time.sleep(0.2)
    assert got == expected
    states = {(a["labels"]["alertname"], a["labels"].get("instance")): a["status"]
              for a in _get(f"{alertmanager_url}/api/v2/alerts")}
    assert states[("LLMHighErrorRate", None)]["state"] == "suppressed"
    assert states[("GPUHighUtilization", "node1:9464")]["inhibitedBy"]
    assert states[("GPUHighUtilization", "node2:9464")]["state"] == "active"
