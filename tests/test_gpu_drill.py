"""The GPU health drill phases on a live stack: the fake NVML injects an uncorrectable ECC error, an
XID 79 (through NVML's event API) and thermal throttling; each alert must fire with its labels, reach
its receiver and resolve once the fault is cleared, from both GPU sources at once: the exporter's NVML
series and a fake dcgm-exporter's series on the same state, mapped by the `both` source's rules."""

from __future__ import annotations

import asyncio

import pytest

from opskit.live import drill_dcgm, stack
from opskit.live.drill_plan import PHASES
from tests.test_drill import _need_stack_binaries


@pytest.mark.slow
def test_live_gpu_health_phases_pass(tmp_path, capsys):
    from opskit.live import drill

    _need_stack_binaries()
    project = drill.load_project()
    spec = stack.StackSpec(state_dir=tmp_path, timing=drill.DRILL_TIMING, probe_interval_s=1.0,
                           rules={"drill.rules.yml": project.rules}, alertmanager_yml=project.alertmanager_yml,
                           gpu="fake", fake_dcgm=True)
    phases = [drill_dcgm.both_sources(p) for p in PHASES if p.name in ("gpu-ecc", "gpu-xid79", "gpu-thermal")]
    assert len(phases) == 3
    st = stack.up(spec)
    try:
        misses = asyncio.run(drill.drive(st, project, phases, rps=5, timeout_s=40, gpu=True, dashboards=False))
    finally:
        stack.down(tmp_path)
    out = capsys.readouterr().out
    assert misses == [], out
    rows = [line for line in out.splitlines() if "required" in line]
    for alert, receiver in (("GPUHardwareErrors", "pager"), ("GPUThermalThrottling", "chat")):
        for key in (alert, alert + drill_dcgm.SUFFIX):
            assert any(r.split("required")[0].strip() == key and r.split()[-1] == receiver for r in rows), out
