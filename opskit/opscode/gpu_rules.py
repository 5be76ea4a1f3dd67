"""GPU rules for either GPU source: recording rules that map dcgm-exporter onto opskit's GPU series,
and the GPU health alerts.

The GPU dashboard and every GPU alert read opskit's own series names (opskit.core.catalog). Where a
cluster already runs NVIDIA's dcgm-exporter, the `dcgm` source adds recording rules that write those
same names from dcgm-exporter's series (percent -> 0-1 ratio, MiB -> bytes, MHz -> hertz, mJ -> joules,
total memory = used + free + reserved), so one dashboard and one alert set work on either source:

- `nvml` (default): opskit's exporter reads NVML itself; no mapping rules.
- `dcgm`: the mapping rules, and nothing that needs opskit's NVML-only series.
- `both`: a fleet with some nodes of each kind. A node that runs both exporters reports each GPU twice
  (two `instance`s), so pick one source per node.

The mapped series keep every dcgm-exporter label (gpu, Hostname, modelName, pod, namespace, container,
instance, job...) except `UUID`, which becomes opskit's `uuid`. dcgm-exporter's `DCGM_FI_DEV_XID_ERRORS`
is the *last* XID code a GPU reported (a gauge, not a count), so for that source the critical-XID
signal is "the last XID is one of the critical codes" and stays on until another XID or a reset,
while for NVML it is "an XID with that code in the last 10 minutes".
"""

from __future__ import annotations

import re

from opskit.core import catalog as c
from opskit.core.thresholds import Thresholds
from opskit.opscode.alert_rules import Alert, Group, Recording

SOURCES = ("nvml", "dcgm", "both")
DEFAULT_SOURCE = "nvml"
DEFAULT_DCGM_JOB = ".*dcgm.*"
MIB = 1024 * 1024
RECORDING_GROUP = "opskit.gpu.recording"
ALERT_GROUP = "opskit.gpu.alerts"
# Critical XIDs seen recently, per GPU and code (value > 0 when seen); the one record both sources feed.
XID_RECENT = "gpu:opskit_gpu_xid_errors:increase10m"
_XIDS = re.compile(r"^\s*[0-9]+(\s*,\s*[0-9]+)*\s*$")


def check_source(source: str) -> None:
    """ValueError unless `source` is one of SOURCES."""
    if source not in SOURCES:
        raise ValueError(f"gpu source: {source!r} is not one of {', '.join(SOURCES)}")


def critical_xids(t: Thresholds) -> tuple[int, ...]:
    """The paging XID codes of the thresholds, sorted; ValueError when the list is malformed."""
    if not _XIDS.match(t.gpu_critical_xids):
        raise ValueError(f"gpu_critical_xids: {t.gpu_critical_xids!r} is not a comma-separated list of XID codes")
    return tuple(sorted({int(x) for x in t.gpu_critical_xids.split(",")}))


def _dcgm(expr: str) -> str:
    """A dcgm-exporter expression with `UUID` renamed to `uuid`."""
    return f'max without (UUID) (label_replace({expr}, "uuid", "$1", "UUID", "(.*)"))'


def dcgm_recordings(t: Thresholds, dcgm_job: str = DEFAULT_DCGM_JOB) -> tuple[Recording, ...]:
    """opskit's GPU series written from dcgm-exporter's (catalog.DCGM_FIELDS)."""
    used, free, reserved = "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_RESERVED"
    xid = "DCGM_FI_DEV_XID_ERRORS"
    info = (f'label_replace(label_replace({used} * 0 + 1, "name", "$1", "modelName", "(.*)"), '
            f'"driver_version", "$1", "DCGM_FI_DRIVER_VERSION", "(.*)")')
    return (
        Recording(c.GPU_UTILIZATION.name, _dcgm("DCGM_FI_DEV_GPU_UTIL / 100")),
        Recording(c.GPU_MEMORY_USED.name, _dcgm(f"{used} * {MIB}")),
        # Older releases have no FB_RESERVED: count it as 0 there.
        Recording(c.GPU_MEMORY_TOTAL.name, _dcgm(f"({used} + {free} + ({reserved} or {used} * 0)) * {MIB}")),
        Recording(c.GPU_TEMPERATURE.name, _dcgm("DCGM_FI_DEV_GPU_TEMP")),
        Recording(c.GPU_POWER.name, _dcgm("DCGM_FI_DEV_POWER_USAGE")),
        Recording(c.GPU_INFO.name, f"max without (modelName, DCGM_FI_DRIVER_VERSION) ({_dcgm(info)})"),
        Recording(c.GPU_UP.name, f'up{{job=~"{dcgm_job}"}}'),
        Recording(c.GPU_CLOCK.name, _dcgm("DCGM_FI_DEV_SM_CLOCK * 1e+06"), {"clock": "sm"}),
        Recording(c.GPU_CLOCK.name, _dcgm("DCGM_FI_DEV_MEM_CLOCK * 1e+06"), {"clock": "memory"}),
        Recording(c.GPU_ENERGY.name, _dcgm("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION / 1000")),
        Recording(c.GPU_PCIE_REPLAYS.name, _dcgm("DCGM_FI_DEV_PCIE_REPLAY_COUNTER")),
        Recording(c.GPU_REMAPPED_ROWS.name, _dcgm("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"), {"cause": "correctable"}),
        Recording(c.GPU_REMAPPED_ROWS.name, _dcgm("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"), {"cause": "uncorrectable"}),
        Recording(c.GPU_ROW_REMAP_FAILURE.name, _dcgm("DCGM_FI_DEV_ROW_REMAP_FAILURE")),
        # Off in dcgm-exporter's default counters: recorded only where a cluster turns them on.
        Recording(c.GPU_ECC_UNCORRECTED.name, _dcgm("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"), {"scope": "volatile"}),
        Recording(c.GPU_ECC_UNCORRECTED.name, _dcgm("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL"), {"scope": "aggregate"}),
        # Violation counters are nanoseconds spent throttled: throttled = any of it in the last 2m.
        Recording(c.GPU_THROTTLED.name, _dcgm("rate(DCGM_FI_DEV_THERMAL_VIOLATION[2m]) > bool 0"), {"reason": "thermal"}),
        Recording(c.GPU_THROTTLED.name, _dcgm("rate(DCGM_FI_DEV_POWER_VIOLATION[2m]) > bool 0"), {"reason": "power"}),
        # The last XID is a value, and PromQL cannot turn a value into a label: one term per critical code.
        *(Recording(XID_RECENT, _dcgm(f"{xid} == bool {code}"), {"xid": str(code)}) for code in critical_xids(t)),
    )


def nvml_recordings() -> tuple[Recording, ...]:
    """Recordings over opskit's own NVML series."""
    x = c.GPU_XID_ERRORS.name
    # A counter's first sample is its first XID, which increase() cannot see: a series that did not
    # exist 10m ago counts whole. round(): whole XIDs, not increase()'s extrapolation to the window.
    return (Recording(XID_RECENT, f"({x} unless {x} offset 10m) or round(increase({x}[10m]))"),)


def recordings(t: Thresholds, source: str = DEFAULT_SOURCE,
               dcgm_job: str = DEFAULT_DCGM_JOB) -> tuple[Recording, ...]:
    """The GPU recording rules for `source`."""
    check_source(source)
    dcgm = dcgm_recordings(t, dcgm_job) if source in ("dcgm", "both") else ()
    nvml = nvml_recordings() if source in ("nvml", "both") else ()
    return (*dcgm, *nvml)


def recording_names() -> set[str]:
    """Names of opskit's own GPU recording rules (not the mapped catalogue names)."""
    return {XID_RECENT}


def health_alerts(t: Thresholds) -> tuple[Alert, ...]:
    """Alerts that predict or report a failing GPU."""
    gpu = "GPU {{ $labels.gpu }} on {{ $labels.instance }}"
    xids = "|".join(str(x) for x in critical_xids(t))
    ecc = f'{c.GPU_ECC_UNCORRECTED.name}{{scope="volatile"}} > 0'
    throttled = c.GPU_THROTTLED.name
    hardware = " or ".join((
        f'label_replace({ecc}, "error", "uncorrectable_ecc", "", "")',
        f'label_replace({c.GPU_ROW_REMAP_FAILURE.name} > 0, "error", "row_remap_failure", "", "")',
        f'label_replace({XID_RECENT}{{xid=~"{xids}"}} > 0, "error", "xid_$1", "xid", "(.*)")',
    ))
    return (
        Alert("GPUHardwareErrors", hardware, None, "critical",
              f"{gpu} reports a hardware error ({{{{ $labels.error }}}})",
              f"{gpu} reports {{{{ $labels.error }}}} (value {{{{ $value }}}}): an uncorrectable ECC error "
              f"since the driver loaded, a failed row remap, or a critical XID ({t.gpu_critical_xids}). Drain "
              f"it; it needs a reset or a replacement."),
        Alert("GPUThermalThrottling", f'{throttled}{{reason="thermal"}} == 1', t.gpu_throttle_for, "warning",
              f"{gpu} is throttled by heat",
              f"{gpu} has held its clocks down because of its temperature for {t.gpu_throttle_for}."),
        Alert("GPUPowerThrottling", f'{throttled}{{reason="power"}} == 1', t.gpu_throttle_for, "warning",
              f"{gpu} is throttled by its power cap",
              f"{gpu} has held its clocks down at its power limit for {t.gpu_throttle_for}."),
        Alert("GPURowRemapPending", f"{c.GPU_ROW_REMAP_PENDING.name} == 1", None, "ticket",
              f"{gpu} needs a reset to finish a row remap",
              f"{gpu} has a memory row remap pending: reset the GPU at the next maintenance "
              f"(value {{{{ $value }}}})."),
    )


def recording_group(t: Thresholds, source: str = DEFAULT_SOURCE, dcgm_job: str = DEFAULT_DCGM_JOB) -> Group:
    """The GPU recording rules for `source`, as a group."""
    return Group(RECORDING_GROUP, recordings(t, source, dcgm_job))


def alert_group(t: Thresholds) -> Group:
    """The GPU health alerts, as a group."""
    return Group(ALERT_GROUP, health_alerts(t))
