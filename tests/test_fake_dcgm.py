"""The fake dcgm-exporter (opskit.live.fake_dcgm): dcgm-exporter's exact text format, values from the
fake NVML's state file, and the drill plan that requires each GPU alert from both GPU sources."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from opskit.core import catalog
from opskit.live import drill_dcgm, fake_dcgm, stack_config
from opskit.live.drill_plan import PHASES, Seen, phase_misses
from opskit.live.fakenvml import (
    GIB,
    NOT_SUPPORTED,
    UNKNOWN_ERROR,
    fake_gpus,
    read_state,
    uuid_for,
    write_state,
)

MIB = 1 << 20
# dcgm-exporter's gpuMetricsFormat at catalog.DCGM_EXPORTER_VERSION: these labels in this order, then
# its labels (DCGM_FI_DRIVER_VERSION) and attributes (Kubernetes, XID), each sorted by name.
LINE = re.compile(r'^(DCGM_FI_\w+)\{gpu="(\d+)",UUID="(GPU-[^"]+)",pci_bus_id="[0-9A-F]{8}:[0-9A-F]{2}:00\.0",'
                  r'device="nvidia\2",modelName="([^"]+)",Hostname="node-a",DCGM_FI_DRIVER_VERSION="550\.54\.15"'
                  r'((?:,[a-z_]+="[^"]*")*)\} (-?\d+(?:\.\d{6})?)$')


def render(gpus, pods=None, violations=None) -> str:
    return fake_dcgm.render("550.54.15", gpus, "node-a", pods or {}, violations or {})


def families(text: str) -> dict[str, dict[str, float]]:
    """family name -> {gpu: value}, through prometheus_client's parser of the text format."""
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(fam.name, {})[s.labels["gpu"]] = s.value
    return out


def test_text_is_dcgm_exporters_format_line_by_line():
    text = render(fake_gpus(2, util=37, xids=(79,)), pods={"1": ("llm", "vllm-1", "vllm")})
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert lines[i + 1] == f"# TYPE {name} {catalog.DCGM_FIELDS[name].type}", name
        elif not line.startswith("# TYPE "):
            m = LINE.match(line)
            assert m, line
            extra = [kv.split("=")[0] for kv in m.group(5).split(",") if kv]
            assert extra == sorted(extra), line          # attributes sorted by name, as its Go template
            if m.group(2) == "1":
                assert {"container", "namespace", "pod", "pod_uid"} <= set(extra), line
            else:
                assert not {"pod", "namespace", "container"} & set(extra), line
    # Every field opskit maps, each once, under its catalogue type; help texts as the counters file has.
    helps = {line.split()[2]: line.split(" ", 3)[3] for line in lines if line.startswith("# HELP ")}
    assert set(helps) == set(catalog.DCGM_FIELDS)
    assert helps["DCGM_FI_DEV_FB_USED"] == "Framebuffer memory used (in MiB)."
    assert helps["DCGM_FI_DEV_XID_ERRORS"] == "Value of the last XID error encountered."
    xid = next(line for line in lines if line.startswith('DCGM_FI_DEV_XID_ERRORS{gpu="0"'))
    assert 'err_code="79",err_msg="GPU has fallen off the bus"' in xid and xid.endswith(" 79")
    power = next(line for line in lines if line.startswith('DCGM_FI_DEV_POWER_USAGE{gpu="0"'))
    assert power.endswith(" 100.000000")  # a DCGM double prints with %f


def test_values_follow_the_state_in_dcgms_units():
    gpus = fake_gpus(2, util=37, mem_used=3 * GIB, temp=55, power_mw=250_500, ecc_volatile=1, remap_failure=1)
    got = families(render(gpus))
    assert got["DCGM_FI_DEV_GPU_UTIL"] == {"0": 37, "1": 37}
    assert got["DCGM_FI_PROF_GR_ENGINE_ACTIVE"]["0"] == pytest.approx(0.37)
    assert got["DCGM_FI_DEV_FB_USED"]["0"] == 3 * 1024
    total = sum(got[f"DCGM_FI_DEV_FB_{k}"]["0"] for k in ("USED", "FREE", "RESERVED"))
    assert total * MIB == 80 * GIB  # what the dcgm mapping records as total memory
    assert got["DCGM_FI_DEV_GPU_TEMP"]["1"] == 55 and got["DCGM_FI_DEV_POWER_USAGE"]["1"] == 250.5
    assert got["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"]["0"] == 1 and got["DCGM_FI_DEV_ROW_REMAP_FAILURE"]["0"] == 1
    assert got["DCGM_FI_DEV_XID_ERRORS"] == {"0": 0, "1": 0}


def test_unsupported_failing_and_lost_readings_are_left_out():
    gpus = fake_gpus(3, power_mw=NOT_SUPPORTED, xids=None)
    gpus[1].temp = UNKNOWN_ERROR
    gpus[2].lost = True
    got = families(render(gpus))
    assert "DCGM_FI_DEV_POWER_USAGE" not in got and "DCGM_FI_DEV_XID_ERRORS" not in got
    assert got["DCGM_FI_DEV_GPU_TEMP"] == {"0": 40}
    assert all("2" not in by_gpu for by_gpu in got.values())


def test_violation_counters_grow_only_while_throttled():
    now = [100.0]
    v = fake_dcgm.Violations(clock=lambda: now[0])
    gpus = fake_gpus(1, clocks_event_reasons=0x40)        # hardware thermal slowdown
    assert v.update(gpus) == {(uuid_for(0), "thermal"): 0, (uuid_for(0), "power"): 0}
    now[0] += 2.5
    assert v.update(gpus) == {(uuid_for(0), "thermal"): 2_500_000_000, (uuid_for(0), "power"): 0}
    now[0] += 1
    assert v.update(fake_gpus(1, clocks_event_reasons=0x4)) == {(uuid_for(0), "thermal"): 2_500_000_000,
                                                                (uuid_for(0), "power"): 1_000_000_000}
    text = render(gpus, violations=v.update(gpus))
    assert 'DCGM_FI_DEV_THERMAL_VIOLATION{gpu="0"' in text


def test_served_from_the_state_file_and_500_where_nvml_would_not_start(tmp_path):
    state = write_state(tmp_path / "gpus", fake_gpus(1, util=12))
    ex = fake_dcgm.Exporter(state, "node-a", {})
    status, body = ex.metrics()
    assert status == 200 and families(body)["DCGM_FI_DEV_GPU_UTIL"] == {"0": 12}
    write_state(state, fake_gpus(1, util=95))
    assert families(ex.metrics()[1])["DCGM_FI_DEV_GPU_UTIL"] == {"0": 95}
    write_state(state, fake_gpus(1), init_code=9)
    assert ex.metrics()[0] == 500
    gpus = fake_gpus(2)
    gpus[1].index = 2                                       # a gap: NVML cannot count the GPUs
    write_state(state, gpus)
    assert ex.metrics()[0] == 500
    state.unlink()
    assert ex.metrics()[0] == 500


def test_read_state_reads_what_write_state_writes(tmp_path):
    gpus = fake_gpus(2, util=33, xids=(13, 79), clocks_event_reasons=0x24)
    gpus[0].power_mw, gpus[1].xids = UNKNOWN_ERROR, None
    assert read_state(write_state(tmp_path / "s", gpus, driver="535.1")) == ("535.1", gpus)


@pytest.mark.slow
def test_fake_dcgm_process_serves_metrics_and_rejects_bad_flags(tmp_path):
    import subprocess
    import sys

    from opskit.core import readyfile

    state = write_state(tmp_path / "gpus", fake_gpus(1, util=61))
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "opskit.live.fake_dcgm", "--state", str(state), "--listen",
                             "127.0.0.1:0", "--ready-file", str(ready), "--pod", "0=llm/vllm-0/vllm"])
    try:
        info = readyfile.wait(ready, lambda: None if proc.poll() is None else "exited", 20)
        body = urllib.request.urlopen(info["metrics_url"], timeout=5).read().decode()
        assert 'pod="vllm-0"' in body and families(body)["DCGM_FI_DEV_GPU_UTIL"] == {"0": 61}
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(info["url"] + "/other", timeout=5)
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "opskit.live.fake_dcgm", "--state", str(state), "--pod", "0=x"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "NAMESPACE/POD/CONTAINER" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------- the drill's second source

def test_drill_requires_the_dcgm_alert_where_dcgm_exporter_carries_the_fault():
    by_name = {p.name: drill_dcgm.both_sources(p) for p in PHASES}
    for name in ("gpu-busy", "gpu-memory", "nvml-down", "gpu-ecc", "gpu-xid79", "gpu-thermal", "gpu-power"):
        base = next(p for p in PHASES if p.name == name)
        assert by_name[name].required == base.required | {n + drill_dcgm.SUFFIX for n in base.required}, name
    assert by_name["gpu-row-remap"].required == {"GPURowRemapPending"}   # no pending-remap counter in DCGM
    assert by_name["errors"] == next(p for p in PHASES if p.name == "errors")
    scope = by_name["gpu-xid79"].scopes["GPUHardwareErrors (dcgm)"]
    assert scope == {"alertname": "GPUHardwareErrors", "gpu": "0", "error": "xid_79", "xid": "79",
                     "job": stack_config.DCGM_JOB, "namespace": "llm", "pod": "vllm-0", "container": "vllm"}


def test_a_dcgm_alert_is_tracked_apart_and_its_labels_checked():
    assert drill_dcgm.alert_key({"alertname": "GPUHardwareErrors", "job": "dcgm-exporter"}) == \
        "GPUHardwareErrors (dcgm)"
    assert drill_dcgm.alert_key({"alertname": "GPUHardwareErrors", "job": "opskit"}) == "GPUHardwareErrors"
    phase = drill_dcgm.both_sources(next(p for p in PHASES if p.name == "gpu-ecc"))
    sev = drill_dcgm.severities({"GPUHardwareErrors": "critical"})
    labels = {"alertname": "GPUHardwareErrors", "severity": "critical", "gpu": "0", "error": "uncorrectable_ecc",
              "job": "opskit"}
    dcgm = {**labels, "job": "dcgm-exporter", "namespace": "llm", "pod": "vllm-0", "container": "vllm"}
    seen = {"GPUHardwareErrors": Seen(1, 2, 3, "pager", labels, inactive_at=4, resolved_at=5),
            "GPUHardwareErrors (dcgm)": Seen(1, 2, 3, "pager", dcgm, inactive_at=4, resolved_at=5)}
    assert phase_misses(phase, seen, sev, {"critical": "pager"}) == []
    seen["GPUHardwareErrors (dcgm)"].labels = {**dcgm, "pod": ""}    # the mapping lost the pod
    assert phase_misses(phase, seen, sev, {"critical": "pager"}) == [
        "GPUHardwareErrors (dcgm): notification labels {'pod': ''} should be {'pod': 'vllm-0'}"]
    del seen["GPUHardwareErrors (dcgm)"]                                # the dcgm source never fired
    assert phase_misses(phase, seen, sev, {"critical": "pager"}) == ["GPUHardwareErrors (dcgm): never went pending"]


def test_prometheus_yml_scrapes_a_dcgm_exporter_as_its_own_job():
    import yaml

    cfg = yaml.safe_load(stack_config.prometheus_yml("http://127.0.0.1:9464", "http://127.0.0.1:9093", [],
                                                     stack_config.Timing(), dcgm_url="http://127.0.0.1:9400"))
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == stack_config.DCGM_JOB)
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9400"]}] and job["metrics_path"] == "/metrics"
