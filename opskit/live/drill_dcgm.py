"""The drill's second GPU source: a fake dcgm-exporter beside the exporter's own NVML series.

With the fake GPU, the drill's stack also runs opskit.live.fake_dcgm on the same state file, scraped as
job `dcgm-exporter`, and its Prometheus loads the rules of the `both` GPU source: dcgm-exporter's
series are mapped onto opskit's GPU names (opskit.opscode.gpu_rules) and evaluated by the same alerts,
at the same time as the NVML ones. A GPU fault therefore raises each GPU alert twice, told apart by
`job`; the drill tracks the dcgm one under its own key (`GPUHardwareErrors (dcgm)`) and requires it
wherever dcgm-exporter's counters carry the fault, so one phase proves both sources in one pass.

Pure code, no I/O.
"""

from __future__ import annotations

from dataclasses import replace

from opskit.live.drill_plan import Phase
from opskit.live.fake_gpu import DCGM_POD
from opskit.live.stack_config import DCGM_JOB

GPU_SOURCE = "both"
SUFFIX = " (dcgm)"
# The GPU alerts dcgm-exporter's counters can raise through the mapping: not GPURowRemapPending (no
# pending-remap field among its counters).
ALERTS = frozenset({"GPUHighUtilization", "GPUMemoryNearlyFull", "OpskitGPUMetricsMissing", "GPUHardwareErrors",
                    "GPUThermalThrottling", "GPUPowerThrottling"})


def alert_key(labels: dict[str, str]) -> str:
    """What the drill tracks an alert under: its name, with SUFFIX when the dcgm source raised it."""
    name = labels.get("alertname", "?")
    return name + SUFFIX if labels.get("job") == DCGM_JOB else name


def severities(by_name: dict[str, str]) -> dict[str, str]:
    """Alert severities for both keys of each alert."""
    return {**by_name, **{name + SUFFIX: sev for name, sev in by_name.items()}}


def _scope(scope: dict[str, str], alertname: str) -> dict[str, str]:
    """The labels a dcgm-sourced notification must carry: its name and job, and for a GPU the pod the
    fake dcgm-exporter attributes GPU 0 to (the mapping keeps dcgm-exporter's Kubernetes labels)."""
    out = {**scope, "alertname": alertname, "job": DCGM_JOB}
    if "gpu" in scope:
        out |= {"namespace": DCGM_POD[0], "pod": DCGM_POD[1], "container": DCGM_POD[2]}
    return out


def both_sources(phase: Phase) -> Phase:
    """A GPU phase that also requires (and allows) its alerts from the dcgm source."""
    if not phase.needs_gpu:
        return phase
    names = phase.required & ALERTS
    return replace(phase, what=phase.what + (", on both GPU sources" if names else ""),
                   required=phase.required | {name + SUFFIX for name in names},
                   allowed=phase.allowed | {name + SUFFIX for name in phase.allowed & ALERTS},
                   scopes={**phase.scopes, **{name + SUFFIX: _scope(phase.scope, name) for name in names}})
