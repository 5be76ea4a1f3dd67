"""Kubernetes manifests (deploy/): schema-valid offline, internally consistent, generated files up
to date, and every command line in them accepted by the real CLI it names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from opskit import __version__, cli
from opskit.core import config as cfgmod
from opskit.core.processes import free_port
from opskit.opscode import alert_rules, engine_rules, manifests, rules_file
from tests.conftest import ROOT, stop, wait_for_file

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"   # the oldest minor we claim to support; Indexed Jobs and PodMonitor fields exist there
CRD_KINDS = {"PodMonitor", "PrometheusRule"}
OPSKIT_IMAGE = f"registry.example.com/opskit:{__version__}"


def manifest_files() -> list[Path]:
    files = sorted(DEPLOY.glob("*.yaml")) + sorted((DEPLOY / "generated").glob("*.yaml"))
    return [f for f in files if f.name != "kustomization.yaml"]  # kubectl's, not an API object


def docs() -> list[tuple[str, dict]]:
    out = []
    for f in manifest_files():
        for d in yaml.safe_load_all(f.read_text()):
            if d is not None:
                out.append((f.name, d))
    return out


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in docs() if d["kind"] == kind]


def pod_specs() -> list[tuple[dict, dict]]:
    """(workload, pod template) of every Deployment and Job."""
    return [(d, d["spec"]["template"]) for _, d in docs() if d["kind"] in ("Deployment", "Job")]


def containers() -> list[dict]:
    return [c for _, t in pod_specs() for c in t["spec"]["containers"]]


def test_manifests_exist():
    names = {f.name for f in manifest_files()}
    assert {"model-server.yaml", "app-hosted.yaml", "podmonitor.yaml", "locust.yaml", "locust-release-job.yaml",
            "prometheusrule.yaml", "dashboards.yaml"} <= names


# CRDs (PodMonitor, PrometheusRule) have no built-in schema: their structure is checked below.
@pytest.mark.parametrize("name,doc", [(n, d) for n, d in docs() if d["kind"] not in CRD_KINDS],
                         ids=lambda v: v if isinstance(v, str) else v.get("kind", "?"))
def test_builtin_kinds_validate_strictly(name, doc):
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_workload_selectors_match_their_pod_labels():
    for w, t in pod_specs():
        sel = w["spec"].get("selector", {}).get("matchLabels")
        if sel:  # Jobs generate their own selector
            assert sel.items() <= t["metadata"]["labels"].items(), w["metadata"]["name"]


def test_every_service_selects_pods_and_named_ports_exist():
    templates = [t for _, t in pod_specs()]
    for svc in by_kind("Service"):
        sel = svc["spec"]["selector"]
        pods = [t for t in templates if sel.items() <= t["metadata"]["labels"].items()]
        assert pods, f"Service {svc['metadata']['name']} selects no pod template"
        ports = {p.get("name") for t in pods for c in t["spec"]["containers"] for p in c.get("ports", [])}
        numbers = {p["containerPort"] for t in pods for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert target in (ports if isinstance(target, str) else numbers), (svc["metadata"]["name"], target)


def test_podmonitor_selects_every_exporter_pod_on_its_metrics_port():
    (pm,) = by_kind("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    sel = pm["spec"]["selector"]["matchLabels"]
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    assert endpoint["path"] == "/metrics"
    exporters = [t for _, t in pod_specs()
                 if any(c["name"] == "opskit-exporter" for c in t["spec"]["containers"])]
    assert len(exporters) == 2  # the model-server sidecar and the hosted-API application sidecar
    for t in exporters:
        assert sel.items() <= t["metadata"]["labels"].items()
        ports = {p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
        assert endpoint["port"] in ports
    # The alert rules find exporter targets by job regex; the operator's job label is <ns>/<name>.
    assert "opskit" in pm["metadata"]["name"]
    # The CRD's fields (monitoring.coreos.com/v1): a misspelt key would be dropped by the API server.
    assert set(pm["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                               "podTargetLabels", "sampleLimit"}
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                           "relabelings", "metricRelabelings", "params"}


def test_podmonitor_also_scrapes_the_model_server_port_as_the_engine_job():
    (pm,) = by_kind("PodMonitor")
    (engine,) = [ep for ep in pm["spec"]["podMetricsEndpoints"] if ep["port"] == "model"]
    assert engine["path"] == "/metrics"
    (relabel,) = engine["relabelings"]
    assert relabel["targetLabel"] == "job" and relabel["sourceLabels"] == ["__meta_kubernetes_namespace"]
    job = relabel["replacement"].replace("$1", "llm")
    assert re.fullmatch(engine_rules.DEFAULT_ENGINE_JOB, job) and not re.fullmatch(alert_rules.DEFAULT_EXPORTER_JOB, job)
    servers = [t for _, t in pod_specs() if any(p.get("name") == "model" for c in t["spec"]["containers"]
                                                for p in c.get("ports", []))]
    assert servers and all(pm["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()
                           for t in servers)
    images = [c["image"] for t in servers for c in t["spec"]["containers"] if "vllm" in c["image"]]
    assert images == ["vllm/vllm-openai:v0.11.0"]   # the version engine_catalog follows


def test_prometheusrule_is_generated_from_the_rules_files():
    (pr,) = by_kind("PrometheusRule")
    assert pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["metadata"]["name"] == "opskit"
    expected = [g for f in manifests.rule_files(ROOT / "alerts") for g in yaml.safe_load(f.read_text())["groups"]]
    assert expected, "alerts/*.rules.yml missing"
    for rule in (r for g in expected for r in g["rules"] if "alert" in r):  # made absolute (test below)
        rule["annotations"]["runbook_url"] = rule["annotations"]["runbook_url"].replace(
            rules_file.RUNBOOK_BASE, manifests.EXAMPLE_RUNBOOK_BASE)
    assert pr["spec"]["groups"] == expected
    for group in pr["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule) and isinstance(rule["expr"], str)
            if "alert" in rule:
                assert rule["labels"]["severity"] and rule["annotations"]["runbook_url"]


def test_prometheusrule_runbook_links_are_absolute_and_a_base_is_required(tmp_path):
    (pr,) = by_kind("PrometheusRule")
    urls = [r["annotations"]["runbook_url"] for g in pr["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert urls and all(u.startswith(manifests.EXAMPLE_RUNBOOK_BASE + "#") for u in urls)
    runner, base = CliRunner(), "https://git.example.org/ops/opskit/blob/main/alerts/runbook.md"
    for args in ([], ["--runbook-base", "alerts/runbook.md"], ["--runbook-base", base + "#x"]):
        res = runner.invoke(cli.main, ["generate", "manifests", "--out-dir", str(tmp_path), *args],
                            env={"OPSKIT_RUNBOOK_BASE": ""})
        assert res.exit_code == 2 and "--runbook-base" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli.main, ["generate", "manifests", "--out-dir", str(tmp_path)],
                        env={"OPSKIT_RUNBOOK_BASE": base})
    assert res.exit_code == 0, res.output
    rule = yaml.safe_load((tmp_path / manifests.RULES_FILE).read_text())
    mine = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert mine == [u.replace(manifests.EXAMPLE_RUNBOOK_BASE, base) for u in urls]
    assert f"{base}#llmspendbudgetburn" in mine


def test_prometheusrule_spec_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (make install installs it from Debian)")
    (pr,) = by_kind("PrometheusRule")
    f = tmp_path / "rules.yml"
    f.write_text(yaml.safe_dump(pr["spec"]))
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_configmaps_are_labelled_for_grafana_and_hold_valid_json():
    boards = manifests.dashboard_files(ROOT / "dashboards")
    maps = [d for name, d in docs() if name == "dashboards.yaml"]
    assert len(maps) == len(boards)
    for cm, path in zip(maps, boards, strict=True):
        assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (key, text), = cm["data"].items()
        assert key == path.name and json.loads(text) == json.loads(path.read_text())
        assert len(yaml.safe_dump(cm).encode()) < manifests.CONFIGMAP_MAX_BYTES


def test_generated_files_are_up_to_date():
    for name, text in manifests.outputs(ROOT / "alerts", ROOT / "dashboards").items():
        committed = DEPLOY / "generated" / name
        assert committed.read_text() == text, f"{committed} is stale: run opskit generate manifests"


def test_generate_check_reports_a_stale_file(tmp_path):
    runner = CliRunner()
    base = ["--runbook-base", manifests.EXAMPLE_RUNBOOK_BASE]
    res = runner.invoke(cli.main, ["generate", "manifests", "--out-dir", str(tmp_path), "--check", *base])
    assert res.exit_code == 1 and "out of date" in res.output and "prometheusrule.yaml" in res.output
    assert runner.invoke(cli.main, ["generate", "manifests", "--out-dir", str(tmp_path), *base]).exit_code == 0
    res = runner.invoke(cli.main, ["generate", "manifests", "--out-dir", str(tmp_path), "--check", *base])
    assert res.exit_code == 0 and "up to date" in res.output
    broken = tmp_path / "rules"
    broken.mkdir()
    (broken / "x.rules.yml").write_text("groups: [unclosed\n")
    res = runner.invoke(cli.main, ["generate", "manifests", "--alerts-dir", str(broken), "--out-dir", str(tmp_path),
                                   *base])
    assert res.exit_code == 2 and "valid YAML" in res.output and "Traceback" not in res.output


def test_configmap_name_is_dns_safe():
    assert manifests.configmap_name(Path("LLM API.dashboard.json")) == "opskit-dashboard-llm-api"


def _exporter_args() -> list[list[str]]:
    return [c["args"] for c in containers() if c["name"] == "opskit-exporter"]


def test_exporter_sidecar_args_are_accepted_by_the_real_cli():
    from opskit.cli import main

    for args in _exporter_args():
        assert args[0] == "exporter"
        cmd = main.get_command(None, "exporter")
        ctx = cmd.make_context("exporter", list(args[1:]), resilient_parsing=False)
        assert ctx.params  # parsed without a usage error


def test_embedded_opskit_configs_parse(tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-test-not-a-real-key\n")
    for cm in by_kind("ConfigMap"):
        if "opskit.yaml" not in cm.get("data", {}):
            continue
        data = yaml.safe_load(cm["data"]["opskit.yaml"])
        for t in data["targets"]:
            if "api_key_file" in t.get("auth", {}):
                t["auth"]["api_key_file"] = str(key)  # the Secret's mount, here a temp file
        cfg = cfgmod.parse(data, cm["metadata"]["name"], env={})
        assert cfg.targets and cfg.probe.interval_s > 0


def test_images_are_pinned_and_opskit_matches_the_package_version():
    for c in containers():
        image = c["image"]
        assert ":" in image and not image.endswith(":latest"), image
        if "opskit" in image:
            assert image == OPSKIT_IMAGE


def test_no_secret_values_in_manifests():
    for c in containers():
        for e in c.get("env", []):
            assert "valueFrom" in e or not any(w in e["name"].upper() for w in ("KEY", "TOKEN", "SECRET", "PASSWORD")), e
    text = "\n".join(f.read_text() for f in manifest_files())
    assert "sk-" not in text


def test_locust_workers_point_at_a_master_service():
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    for c in containers():
        words = " ".join(c.get("command", []) + c.get("args", [])).split()
        if "--worker" in words:
            master = words[words.index("--master-host") + 1].strip('",[]')
            assert master in services and any(p["port"] == 5557 for p in services[master]["spec"]["ports"])


def test_release_job_workers_match_the_masters_expectation():
    jobs = {j["metadata"]["name"]: j for j in by_kind("Job")}
    master, workers = jobs["locust-release-master"], jobs["locust-release-workers"]
    args = master["spec"]["template"]["spec"]["containers"][0]["args"]
    expect = int(args[args.index("--expect-workers") + 1])
    assert workers["spec"]["completionMode"] == "Indexed"
    assert workers["spec"]["parallelism"] == workers["spec"]["completions"] == expect
    assert master["spec"]["backoffLimit"] == 0


def test_dockerfile_runs_opskit_as_a_numeric_non_root_user():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11")
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].isdigit() and users[-1] != "0"
    assert 'ENTRYPOINT ["opskit"]' in lines
    for needed in ("pyproject.toml", "opskit", "loadtests", "alerts", "dashboards", "deploy"):
        assert any(ln.startswith("COPY") and needed in ln for ln in lines), needed
    # the final stage takes only the venv the wheel was installed into, nothing from the checkout
    final = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM")):]
    assert [ln for ln in final if ln.startswith("COPY")] == ["COPY --from=build /venv /venv"]
    assert any("pip install" in ln and ".whl" in ln for ln in lines)


def test_locust_params_are_run_params_aimed_at_the_metering_proxy():
    import dataclasses

    from opskit.loadtest.params import RunParams

    fields = {f.name for f in dataclasses.fields(RunParams)}
    for cm in by_kind("ConfigMap"):
        if "OPSKIT_LT_PARAMS" not in cm.get("data", {}):
            continue
        params = json.loads(cm["data"]["OPSKIT_LT_PARAMS"])
        assert set(params) <= fields, set(params) - fields
        # The model server's proxy forwards to vLLM's root, so clients keep the usual /v1 base URL.
        assert params["base_url"] == "http://llm-server:8000/v1" and params["path"] == "/chat/completions"


@pytest.mark.slow
def test_release_job_command_lines_run_a_real_distributed_locust(tmp_path, mock_server):
    """The release Jobs' exact commands, scaled down (2 workers, 4 s) and pointed at a local mock:
    the master waits for the workers, each worker writes its own per-request log, all exit 0."""
    jobs = {j["metadata"]["name"]: j for j in by_kind("Job")}
    (params_cm,) = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "locust-release-params"]
    params = json.loads(params_cm["data"]["OPSKIT_LT_PARAMS"])
    runs = tmp_path / "runs"
    params.update(base_url=mock_server.api, duration=4, users=4, workers=2,
                  run_dir=params["run_dir"].replace("/runs", str(runs)))
    port = str(free_port())
    local = {"/app/loadtests": str(ROOT / "loadtests"), "/runs": str(runs)}

    def localize(word: str) -> str:
        for k, v in local.items():
            word = word.replace(k, v)
        return word

    master = jobs["locust-release-master"]["spec"]["template"]["spec"]["containers"][0]
    args = [localize(a) for a in master["args"]]
    for flag, value in (("--expect-workers", "2"), ("--users", "4"), ("--spawn-rate", "4"), ("--run-time", "7s"),
                        ("--expect-workers-max-wait", "60")):
        args[args.index(flag) + 1] = value
    env = {**os.environ, "OPSKIT_LT_PARAMS": json.dumps(params),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    runs.mkdir()
    procs = [subprocess.Popen([*master["command"], *args, "--master-bind-host", "127.0.0.1", "--master-bind-port", port],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    worker = jobs["locust-release-workers"]["spec"]["template"]["spec"]["containers"][0]
    script = localize(worker["args"][0]).replace('"locust-release-master"]', f'"127.0.0.1", "--master-port", "{port}"]')
    try:
        for i in range(2):
            procs.append(subprocess.Popen([*worker["command"], script], env={**env, "JOB_COMPLETION_INDEX": str(i)},
                                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        out = procs[0].communicate(timeout=90)[0].decode()
        assert procs[0].returncode == 0, out[-3000:]
        for w in procs[1:]:
            w.wait(timeout=30)
            assert w.returncode == 0, w.stdout.read().decode()[-2000:]
    finally:
        for p in procs:
            stop(p)
    logs = sorted((runs / "release" / "log").glob("requests-streaming-*.jsonl"))
    assert [p.name for p in logs] == ["requests-streaming-0.jsonl", "requests-streaming-1.jsonl"]
    rows = [json.loads(line) for p in logs for line in p.read_text().splitlines()]
    assert rows and {r["worker"] for r in rows} == {0, 1} and all(r["status"] == 200 for r in rows)
    assert (runs / "release" / "locust_stats.csv").exists()
    # the master's last step judged the run from both workers' logs, as opskit loadtest would
    summary = json.loads((runs / "release" / "summary.json").read_text())
    assert summary["passed"] and summary["scenarios"]["streaming"]["requests"] == len(rows)
    assert summary["params"]["streaming"]["processes"] == 2 and (runs / "release" / "report.html").exists()
    again = subprocess.run([sys.executable, "-m", "opskit", "report", "evaluate", str(runs / "release")],
                           env={**env, "OPSKIT_LT_PARAMS": ""}, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "VERDICT: PASS" in again.stdout, again.stdout + again.stderr
    # the same load run by opskit loadtest itself (2 Locust processes) gets the same checks and verdict
    local = subprocess.run([sys.executable, "-m", "opskit", "loadtest", "streaming", "--processes", "2", "--users", "4",
                            "--duration", "4", "--target", mock_server.api, "--no-proxy", "--out", str(tmp_path / "own")],
                           env={**env, "OPSKIT_LT_PARAMS": ""}, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stdout + local.stderr
    (own,) = (tmp_path / "own").iterdir()
    mine = json.loads((own / "summary.json").read_text())
    assert {c["name"] for c in mine["checks"]} == {c["name"] for c in summary["checks"]}
    assert mine["passed"] == summary["passed"]
    n_own, n_job = mine["scenarios"]["streaming"]["requests"], summary["scenarios"]["streaming"]["requests"]
    assert abs(n_own - n_job) <= 0.3 * n_job, (n_own, n_job)  # 4 users for 4 s, both ways


@pytest.mark.slow
@pytest.mark.parametrize("deployment,target,client_path", [("llm-server", "llm-server", "/v1"),
                                                            ("chat-app", "deepseek", "")])
def test_exporter_sidecar_runs_as_deployed(tmp_path, mock_server, deployment, target, client_path):
    """The sidecar's exact args and ConfigMap, pointed at a local mock instead of vLLM/DeepSeek:
    a client calling the proxy as the manifest says gets through, and proxy and probe series share
    the configured target's name."""
    from prometheus_client.parser import text_string_to_metric_families

    (dep,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == deployment]
    (sidecar,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "opskit-exporter"]
    (cm,) = [c for c in by_kind("ConfigMap") if c["metadata"]["name"] == f"{deployment}-opskit"]
    cfg = yaml.safe_load(cm["data"]["opskit.yaml"])
    real_base = cfg["targets"][0]["base_url"]
    cfg["targets"][0]["base_url"] = mock_server.api
    cfg["probe"]["interval_s"] = 0.5
    if "api_key_file" in cfg["targets"][0].get("auth", {}):
        (tmp_path / "key").write_text("sk-local-test\n")
        cfg["targets"][0]["auth"]["api_key_file"] = str(tmp_path / "key")
    (tmp_path / "opskit.yaml").write_text(yaml.safe_dump(cfg))
    # The proxy's --upstream is the target's base_url or, for vLLM, its root (base_url without /v1).
    swap = {"/etc/opskit/opskit.yaml": str(tmp_path / "opskit.yaml"), real_base: mock_server.api}
    if real_base.endswith("/v1"):
        swap[real_base.removesuffix("/v1")] = mock_server.url
    args = [swap.get(a, a) for a in sidecar["args"]]
    args = ["127.0.0.1:0" if a.endswith((":9464", ":8080")) else a for a in args]
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "opskit", *args, "--ready-file", str(ready)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        info = wait_for_file(ready, proc)
        body = json.dumps({"model": cfg["targets"][0]["models"][0], "max_tokens": 4,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        # As the manifest's clients do: the Service's /v1 (locust params), the app's OPENAI_BASE_URL.
        req = urllib.request.Request(info["proxy_url"] + client_path + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(info["url"] + "/metrics", timeout=5) as resp:
                samples = [s for f in text_string_to_metric_families(resp.read().decode()) for s in f.samples
                           if s.name == "opskit_llm_requests_total"]
            sources = {s.labels["source"] for s in samples}
            if sources == {"proxy", "probe"} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sources == {"proxy", "probe"}
        assert {s.labels["target"] for s in samples} == {target}
    finally:
        stop(proc)


def test_kustomization_lists_every_manifest_but_the_on_demand_release_run():
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization"
    listed = {DEPLOY / r for r in k["resources"]}
    assert all(p.is_file() for p in listed)
    assert listed == set(manifest_files()) - {DEPLOY / "locust-release-job.yaml"}
