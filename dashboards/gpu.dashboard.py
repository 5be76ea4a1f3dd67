"""The "GPU" dashboard: utilization, memory, temperature, power and NVML health per GPU.

Read by NVML at scrape time by the opskit exporter (one per node or pod). Threshold lines are the
alert thresholds from opskit.core.thresholds.
"""

from __future__ import annotations

from opskit.core import catalog as c
from opskit.core.thresholds import Thresholds
from opskit.opscode.panels import (
    RATE,
    gauge_panel,
    scope_variables,
    scoped,
    target,
    timeseries,
    unit_of,
    variable,
)
from opskit.opscode.panels import (
    dashboard as make_dashboard,
)

SEL = scoped("instance", "gpu")
LEGEND = "{{instance}} GPU {{gpu}}"


def usage(t: Thresholds) -> list:
    """Utilization and memory."""
    used, total = c.GPU_MEMORY_USED.name, c.GPU_MEMORY_TOTAL.name
    return [
        gauge_panel(c.GPU_UTILIZATION, "GPU utilization", SEL, LEGEND, line=t.gpu_utilization_ratio,
                    description=f"{c.GPU_UTILIZATION.help} Line: the alert threshold "
                                f"({t.gpu_utilization_ratio:.0%} for {t.gpu_utilization_for})."),
        timeseries("Memory used vs total", "GPU memory in use and installed, per GPU.", unit_of(c.GPU_MEMORY_USED),
                   [target(f"{used}{SEL}", f"{LEGEND} used"), target(f"{total}{SEL}", f"{LEGEND} total")]),
        timeseries("Memory used ratio", f"Memory in use over memory installed. Line: the alert threshold "
                   f"({t.gpu_memory_ratio:.0%} for {t.gpu_memory_for}).", "percentunit",
                   [target(f"{used}{SEL} / ({total}{SEL} > 0)", LEGEND)], (("red", t.gpu_memory_ratio),)),
    ]


def physical(t: Thresholds) -> list:
    """Temperature and power."""
    return [
        gauge_panel(c.GPU_TEMPERATURE, "Temperature", SEL, LEGEND),
        gauge_panel(c.GPU_POWER, "Power draw", SEL, LEGEND),
    ]


def health(t: Thresholds) -> list:
    """Whether NVML answers, and why not."""
    return [
        gauge_panel(c.GPU_UP, "NVML answering", scoped("instance"), "{{instance}}", unit="bool_yes_no"),
        timeseries("NVML errors by reason", f"NVML errors per second over {RATE}. {c.GPU_COLLECT_ERRORS.help}",
                   "short", [target(f"sum by (instance, reason) (rate({c.GPU_COLLECT_ERRORS.name}"
                                    f"{scoped('instance')}[{RATE}]))", "{{instance}} {{reason}}")]),
        timeseries("GPUs seen", "Number of GPUs each exporter reports (opskit_gpu_info); a drop means a GPU "
                   "fell off the bus or out of the container.", "short",
                   [target(f"count by (instance, name) ({c.GPU_INFO.name}{scoped('instance')})",
                           "{{instance}} {{name}}")]),
    ]


def hardware(t: Thresholds) -> list:
    """The signals that predict a failing GPU (the GPUHardwareErrors, throttling and row-remap alerts)."""
    inc = f"[{RATE}]"
    return [
        timeseries("Uncorrectable ECC errors and XIDs",
                   f"New uncorrectable ECC errors (by scope) and XID errors (by code) over {RATE}. Any of "
                   f"XIDs {t.gpu_critical_xids} or an uncorrectable ECC error pages (GPUHardwareErrors).", "short",
                   [target(f"increase({c.GPU_ECC_UNCORRECTED.name}{SEL}{inc})", f"{LEGEND} ECC {{{{scope}}}}"),
                    target(f"increase({c.GPU_XID_ERRORS.name}{SEL}{inc})", f"{LEGEND} XID {{{{xid}}}}", "B")]),
        timeseries("Clock throttling",
                   f"1 while the clocks are held down, by reason. Thermal or power throttling for "
                   f"{t.gpu_throttle_for} warns.", "bool_yes_no",
                   [target(f"{c.GPU_THROTTLED.name}{SEL}", f"{LEGEND} {{{{reason}}}}")]),
        timeseries("Row remapping",
                   "Rows remapped by cause; a pending remap needs a GPU reset (ticket), a failed one a new GPU "
                   "(pages).", "short",
                   [target(f"{c.GPU_REMAPPED_ROWS.name}{SEL}", f"{LEGEND} remapped {{{{cause}}}}"),
                    target(f"{c.GPU_ROW_REMAP_PENDING.name}{SEL}", f"{LEGEND} pending", "B"),
                    target(f"{c.GPU_ROW_REMAP_FAILURE.name}{SEL}", f"{LEGEND} failed", "C")]),
        timeseries("Clocks", "SM and memory clock frequencies; a clock well under its usual value while busy "
                   "is throttling.", unit_of(c.GPU_CLOCK),
                   [target(f"{c.GPU_CLOCK.name}{SEL}", f"{LEGEND} {{{{clock}}}}")]),
        timeseries("Energy and PCIe replays",
                   f"Power from the energy counter (W, over {RATE}) and PCIe link replays per second; rising "
                   "replays mean a bad link or riser.", "short",
                   [target(f"rate({c.GPU_ENERGY.name}{SEL}{inc})", f"{LEGEND} W"),
                    target(f"rate({c.GPU_PCIE_REPLAYS.name}{SEL}{inc})", f"{LEGEND} replays/s", "B")]),
    ]


def build(t: Thresholds) -> object:
    """The GPU dashboard for thresholds `t`."""
    return make_dashboard(
        "GPU", "opskit-gpu",
        "GPUs of the model servers, read through NVML by the opskit exporter at scrape time. "
        "Generated by `opskit generate dashboards`; edit the code, not the JSON.",
        [*scope_variables(c.GPU_UP),
         variable("instance", "Exporter", c.GPU_UP, scoped()),
         variable("gpu", "GPU", c.GPU_INFO, scoped("instance"))],
        [("Utilization and memory", usage(t)), ("Temperature and power", physical(t)),
         ("Hardware health", hardware(t)), ("NVML health", health(t))],
        alerts="GPU.*|OpskitGPU.*",
    )


dashboard = build(Thresholds())  # grafanalib's generate-dashboard reads this; built-in values
