"""Dashboards: built from code, committed JSON up to date, every query valid PromQL over catalogue
series, every panel with a unit and a description, threshold lines equal to the alert thresholds."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess

import pytest
import yaml
from click.testing import CliRunner

from opskit import cli
from opskit.core import catalog, thresholds
from opskit.opscode import dashboards as builder
from opskit.opscode import rules_file
from opskit.opscode.promql import series_names
from tests.conftest import ROOT, need_binary

T = thresholds.Thresholds()


@pytest.fixture(scope="module")
def dashboards():
    return builder.build_all(T)


def _json(d) -> dict:
    return json.loads(builder.to_json(d))


def _panel(d, title: str) -> dict:
    return next(p for p in _json(d)["panels"] if p["title"] == title)


def _lines(panel: dict) -> list[float]:
    return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"] if s["value"] is not None]


def test_committed_json_and_provisioning_are_up_to_date():
    for name, text in builder.outputs(T).items():
        path = ROOT / "dashboards" / "generated" / name
        assert path.is_file() and path.read_text() == text, f"dashboards/generated/{name} is stale: make dashboards"


def test_both_dashboards_exist_with_their_variables(dashboards):
    assert set(dashboards) == {"llm_api", "gpu", "llm_engine"}
    names = {k: [v["name"] for v in _json(d)["templating"]["list"]] for k, d in dashboards.items()}
    assert names["llm_api"] == ["datasource", "cluster", "namespace", "job", "instance", "source", "target", "model"]
    assert names["gpu"][:5] == ["datasource", "cluster", "namespace", "job", "instance"]
    assert names["llm_engine"] == ["datasource", "cluster", "namespace", "instance", "target"]


def test_llm_api_links_to_the_engine_dashboard(dashboards):
    uid = _json(dashboards["llm_engine"])["uid"]
    assert any(link["url"] == f"/d/{uid}" for link in _json(dashboards["llm_api"])["links"])


def test_every_dashboard_links_to_the_others_and_marks_its_alerts(dashboards):
    for name, d in dashboards.items():
        data = _json(d)
        menu = [link for link in data["links"] if link["type"] == "dashboards"]
        assert menu and menu[0]["tags"] == ["opskit"] and data["tags"] == ["opskit"], name
        notes = data["annotations"]["list"]
        assert notes and all(n["expr"].startswith('ALERTS{alertstate="firing"') for n in notes), name


def test_every_panel_is_filtered_by_scope_and_exporter(dashboards):
    # The scope variables match `.*` on All, which also matches a series without the label (the
    # drill runs every query so on a Prometheus without cluster/namespace labels and needs data).
    for board in ("llm_api", "gpu"):
        exprs = [(p["title"], t["expr"]) for p in _json(dashboards[board])["panels"] for t in p.get("targets", [])]
        assert len(exprs) > 10
        for title, expr in exprs:
            for var in ("cluster", "namespace", "job", "instance"):
                assert f'{var}=~"${var}"' in expr, (board, title, var)


def test_source_variable_keeps_canary_calls_out_of_latency_by_default(dashboards):
    data = _json(dashboards["llm_api"])
    source = next(v for v in data["templating"]["list"] if v["name"] == "source")
    assert source["current"]["value"] == "proxy" and source["includeAll"]
    for title in ("Time to first token", "Request duration", "Time per output token", "p95 time to first token"):
        assert all('source=~"$source"' in t["expr"] for t in _panel(dashboards["llm_api"], title)["targets"]), title


def test_at_a_glance_row_comes_first_and_headroom_has_an_axis_each(dashboards):
    panels = _json(dashboards["llm_api"])["panels"]
    assert panels[0]["type"] == "row" and panels[0]["title"] == "At a glance"
    assert [p["title"] for p in panels[1:5]] == ["Availability vs SLO", "Error budget left (30 d)",
                                                 "p95 time to first token", "Projected daily spend"]
    assert all(p["type"] == "stat" for p in panels[1:5])
    assert _lines(_panel(dashboards["llm_api"], "Availability vs SLO")) == [T.availability_slo]
    assert _lines(_panel(dashboards["llm_api"], "p95 time to first token")) == [T.ttft_p95_seconds]
    for kind in ("requests", "tokens"):
        exprs = [t["expr"] for t in _panel(dashboards["llm_api"], f"Rate-limit headroom: {kind}")["targets"]]
        assert exprs and all(f"remaining_{kind}" in e for e in exprs), kind


def test_engine_panels_read_all_three_engines(dashboards):
    # Each engine's own series in the panels that it exports; none of them drifts (catalogue check above).
    exprs = " ".join(t["expr"] for p in _json(dashboards["llm_engine"])["panels"] for t in p.get("targets", []))
    for name in ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "tgi_queue_size", "vllm:kv_cache_usage_perc",
                 "sglang:token_usage", "vllm:num_preemptions_total", "sglang:num_retracted_requests_total",
                 "tgi_request_queue_duration_bucket", "opskit_llm_time_to_first_token_seconds_bucket"):
        assert name in exprs, name


def test_every_panel_has_unit_description_and_a_unique_id(dashboards):
    for d in dashboards.values():
        data = _json(d)
        ids = [p["id"] for p in data["panels"]]
        assert len(ids) == len(set(ids)), d.title
        for p in data["panels"]:
            if p["type"] == "row":
                continue
            assert p["description"], f"{d.title}/{p['title']} has no description"
            assert p["fieldConfig"]["defaults"]["unit"], f"{d.title}/{p['title']} has no unit"
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


def test_queries_name_only_catalogue_series(dashboards):
    known = catalog.all_series()
    queries = builder.all_queries(T)
    assert len(queries) >= 20
    for dash, title, expr in queries:
        names = series_names(expr)
        assert names, f"{dash}/{title}: no series in {expr!r}"
        assert names <= known, f"{dash}/{title} names unknown series {names - known}"
        assert "$" not in expr, f"{dash}/{title}: variable left in {expr!r}"
    for d in dashboards.values():
        for var in _json(d)["templating"]["list"][1:]:
            selector = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]).group(1)
            assert series_names(selector) <= known, var["query"]


def test_every_query_parses_as_promql(tmp_path):
    # promtool 2.42 has no standalone parser: as recording rules, `check rules` parses every expr.
    queries = builder.all_queries(T)
    rules = [{"record": f"opskit_dashboard_check:query{i}", "expr": q} for i, (_, _, q) in enumerate(queries)]
    path = tmp_path / "queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    proc = subprocess.run([need_binary("promtool"), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_promtool_check_catches_a_broken_query(tmp_path):
    # The parse check above must be able to fail.
    path = tmp_path / "bad.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y:z", "expr": builder.substitute("sum by (target (rate(up[$__rate_interval]))")}]}]}))
    proc = subprocess.run([need_binary("promtool"), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0


def test_substitute_fills_variables():
    assert builder.substitute('rate(x{a=~"$target",b=~"${model}"}[$__rate_interval])') == 'rate(x{a=~".*",b=~".*"}[5m])'


def test_threshold_lines_are_the_alert_thresholds(dashboards):
    llm, gpu = dashboards["llm_api"], dashboards["gpu"]
    assert _lines(_panel(llm, "Time to first token")) == [T.ttft_p95_seconds]
    assert _lines(_panel(llm, "Request duration")) == [T.duration_p90_seconds]
    assert _lines(_panel(llm, "Error ratio")) == [T.error_ratio, T.error_ratio_critical]
    assert _lines(_panel(llm, "429 share")) == [T.rate_limited_ratio]
    assert _lines(_panel(gpu, "GPU utilization")) == [T.gpu_utilization_ratio]
    assert _lines(_panel(gpu, "Memory used ratio")) == [T.gpu_memory_ratio]
    engine = dashboards["llm_engine"]
    assert _lines(_panel(engine, "KV-cache usage")) == [T.engine_kv_cache_ratio]
    assert _lines(_panel(engine, "Running and waiting requests")) == [T.engine_waiting_requests]
    assert _lines(_panel(engine, "Server-side vs client-side TTFT")) == [T.ttft_p95_seconds]


def test_ratio_panels_state_the_alerts_traffic_guard(dashboards):
    # The panels plot every target's ratio; their descriptions say why a quiet one does not alert.
    for title in ("Error ratio", "429 share"):
        assert f"at least {T.min_request_rate:g} calls/s" in _panel(dashboards["llm_api"], title)["description"]
    changed = builder.build_all(dataclasses.replace(T, min_request_rate=0.5))
    assert "at least 0.5 calls/s (30/min)" in _panel(changed["llm_api"], "Error ratio")["description"]


def test_a_changed_threshold_changes_rules_and_dashboards_together(tmp_path):
    changed = dataclasses.replace(T, ttft_p95_seconds=0.75, gpu_utilization_ratio=0.8, error_ratio=0.05)
    # Still on a bucket edge, as the catalogue demands.
    assert changed.ttft_p95_seconds in catalog.threshold_edges(changed)["ttft_p95_seconds"][1]
    rules_text = rules_file.render_rules(changed)
    assert "target:opskit_llm_ttft_seconds:p95_5m > 0.75" in rules_text
    assert "opskit_gpu_utilization_ratio > 0.8\n" in rules_text
    assert "target:opskit_llm_errors:ratio_rate5m > 0.05" in rules_text
    dash = builder.build_all(changed)
    assert _lines(_panel(dash["llm_api"], "Time to first token")) == [0.75]
    assert _lines(_panel(dash["gpu"], "GPU utilization")) == [0.8]
    assert _lines(_panel(dash["llm_api"], "Error ratio")) == [0.05, T.error_ratio_critical]
    # The same through an override file, the way an operator changes them.
    override = tmp_path / "thresholds.yaml"
    override.write_text("ttft_p95_seconds: 0.75\n")
    res = CliRunner().invoke(cli.main, ["generate", "dashboards", "--out-dir", str(tmp_path / "g"), "--thresholds", str(override)])
    assert res.exit_code == 0, res.output
    steps = json.loads((tmp_path / "g" / "llm_api.json").read_text())
    ttft = next(p for p in steps["panels"] if p["title"] == "Time to first token")
    assert _lines(ttft) == [0.75]


def test_provisioning_points_grafana_at_the_json_and_prometheus(dashboards):
    files = builder.provisioning("/srv/dash", "http://127.0.0.1:19090")
    provider = yaml.safe_load(files["provisioning/dashboards/opskit.yml"])["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "/srv/dash"
    ds = yaml.safe_load(files["provisioning/datasources/opskit.yml"])["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://127.0.0.1:19090"
    assert ds["isDefault"] is False  # an existing Grafana keeps its own default datasource
    # The dashboards' datasource variable selects the provisioned datasource by default.
    for d in dashboards.values():
        assert _json(d)["templating"]["list"][0]["current"]["value"] == ds["name"]


def test_cli_check_and_errors(tmp_path, clean_env):
    runner = CliRunner()
    res = runner.invoke(cli.main, ["generate", "dashboards", "--out-dir", str(tmp_path), "--check"])
    assert res.exit_code == 1 and "out of date" in res.output
    assert runner.invoke(cli.main, ["generate", "dashboards", "--out-dir", str(tmp_path)]).exit_code == 0
    assert runner.invoke(cli.main, ["generate", "dashboards", "--out-dir", str(tmp_path), "--check"]).exit_code == 0
    bad = tmp_path / "t.yaml"
    bad.write_text("no_such_threshold: 1\n")
    res = runner.invoke(cli.main, ["generate", "dashboards", "--out-dir", str(tmp_path), "--thresholds", str(bad)])
    assert res.exit_code == 2 and "no_such_threshold" in res.output and "Traceback" not in res.output
