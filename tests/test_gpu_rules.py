"""GPU sources and GPU health rules: the `dcgm` mapping names only dcgm-exporter's real series, the
committed dcgm variant is fresh, the flag keeps the default output, and bad values are usage errors.
The mapping's values and the alerts themselves are promtool-tested (alerts/tests/gpu_*.test.yml)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from opskit import cli
from opskit.core import catalog, thresholds
from opskit.opscode import alert_rules, gpu_rules, rules_file
from opskit.opscode.promql import series_names
from tests.conftest import need_binary

ALERTS_DIR = Path(__file__).resolve().parent.parent / "alerts"
T = thresholds.Thresholds()


def _rules(text: str) -> list[dict]:
    return [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]


def test_committed_dcgm_variant_is_what_the_generator_writes():
    text = rules_file.render_rules(T, gpu_source="dcgm")
    assert (ALERTS_DIR / "dcgm" / "opskit.rules.yml").read_text() == text, \
        "alerts/dcgm is stale: run opskit generate alerts --gpu-source dcgm --out-dir alerts/dcgm"


@pytest.mark.parametrize("source", ["dcgm", "both"])
def test_dcgm_rules_read_only_dcgm_exporter_series_and_write_catalogue_ones(source):
    known = catalog.all_series() | alert_rules.recording_names() | set(catalog.DCGM_FIELDS)
    mapped = set()
    for rule in _rules(rules_file.render_rules(T, gpu_source=source)):
        names = series_names(rule["expr"])
        assert names <= known, f"{rule.get('alert') or rule['record']} names unknown series {names - known}"
        if rule.get("record") and names & set(catalog.DCGM_FIELDS):
            assert rule["record"] in catalog.all_series() | gpu_rules.recording_names(), rule["record"]
            mapped.add(rule["record"])
    # Every GPU gauge the dashboard and the load alerts read has a DCGM mapping.
    assert {m.name for m in (catalog.GPU_UTILIZATION, catalog.GPU_MEMORY_USED, catalog.GPU_MEMORY_TOTAL,
                             catalog.GPU_TEMPERATURE, catalog.GPU_POWER, catalog.GPU_INFO)} <= mapped


def test_dcgm_fields_on_by_default_are_the_default_counters_of_the_release():
    # From NVIDIA/dcgm-exporter etc/default-counters.csv at 4.5.3-4.8.2 (uncommented lines).
    assert catalog.DCGM_EXPORTER_VERSION == "4.5.3-4.8.2"
    on = {n for n, f in catalog.DCGM_FIELDS.items() if f.default}
    assert on == {
        "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_RESERVED",
        "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "DCGM_FI_DEV_XID_ERRORS",
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_PROF_GR_ENGINE_ACTIVE"}


def test_sources_differ_only_in_the_gpu_recording_group():
    by_source = {s: yaml.safe_load(rules_file.render_rules(T, gpu_source=s))["groups"] for s in gpu_rules.SOURCES}
    for name in ("opskit.llm.alerts", "opskit.instance.alerts", gpu_rules.ALERT_GROUP):
        same = [next(g for g in groups if g["name"] == name) for groups in by_source.values()]
        assert same[0] == same[1] == same[2], name
    rec = {s: [r["record"] for r in next(g for g in groups if g["name"] == gpu_rules.RECORDING_GROUP)["rules"]]
           for s, groups in by_source.items()}
    assert rec["nvml"] == [gpu_rules.XID_RECENT]
    assert catalog.GPU_UTILIZATION.name in rec["dcgm"] and rec["both"] == rec["dcgm"] + rec["nvml"]


def test_both_sources_pass_promtool(tmp_path):
    path = tmp_path / "both.rules.yml"
    path.write_text(rules_file.render_rules(T, gpu_source="both", dcgm_job="dcgm-exporter"))
    proc = subprocess.run([need_binary("promtool"), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'up{job=~"dcgm-exporter"}' in path.read_text()


def test_critical_xids_come_from_the_thresholds():
    t = dataclasses.replace(T, gpu_critical_xids="79, 48")
    assert gpu_rules.critical_xids(t) == (48, 79)
    hw = next(a for a in gpu_rules.health_alerts(t) if a.name == "GPUHardwareErrors")
    assert 'xid=~"48|79"' in hw.expr
    with pytest.raises(ValueError, match="gpu_critical_xids"):
        gpu_rules.critical_xids(dataclasses.replace(T, gpu_critical_xids="79;48"))


def test_cli_gpu_source(tmp_path, clean_env):
    runner = CliRunner()
    res = runner.invoke(cli.main, ["generate", "alerts", "--out-dir", str(tmp_path), "--gpu-source", "nvml"])
    assert res.exit_code == 0, res.output
    # The default source is nvml: the committed files are what --gpu-source nvml writes.
    assert (tmp_path / "opskit.rules.yml").read_text() == (ALERTS_DIR / "opskit.rules.yml").read_text()
    res = runner.invoke(cli.main, ["generate", "alerts", "--out-dir", str(tmp_path), "--gpu-source", "dcgm",
                                   "--dcgm-job", "gpu-metrics"])
    assert res.exit_code == 0, res.output
    assert 'up{job=~"gpu-metrics"}' in (tmp_path / "opskit.rules.yml").read_text()
    res = runner.invoke(cli.main, ["generate", "alerts", "--out-dir", str(tmp_path), "--gpu-source", "smi"])
    assert res.exit_code == 2 and "smi" in res.output
    bad = tmp_path / "t.yaml"
    bad.write_text("gpu_critical_xids: 'seventy-nine'\n")
    res = runner.invoke(cli.main, ["generate", "alerts", "--out-dir", str(tmp_path), "--thresholds", str(bad)])
    assert res.exit_code == 2 and "gpu_critical_xids" in res.output and "Traceback" not in res.output
