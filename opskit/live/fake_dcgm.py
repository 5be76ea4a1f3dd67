"""A fake NVIDIA dcgm-exporter: `/metrics` in dcgm-exporter's exact text format, values from the fake
NVML's state file (opskit.live.fakenvml), so that one state drives both GPU sources.

What a real dcgm-exporter (release catalog.DCGM_EXPORTER_VERSION) with that release's
etc/default-counters.csv prints, plus the ECC and violation counters that file leaves commented out
(a cluster that wants opskit's GPU health alerts from DCGM turns them on): one `# HELP` / `# TYPE` pair
per field, then one line per GPU, labelled in dcgm-exporter's order

    DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-…",pci_bus_id="00000000:00:00.0",device="nvidia0",
        modelName="NVIDIA H100 80GB HBM3",Hostname="node",DCGM_FI_DRIVER_VERSION="550.54.15"} 40

and, for a GPU attributed to a pod (`--pod 0=NAMESPACE/POD/CONTAINER`), its Kubernetes mapping's
`container`, `namespace`, `pod` and `pod_uid` after them (labels, then attributes, each sorted by name,
as its Go template ranges over maps). DCGM's integer fields print as integers, its doubles with `%f`.
`DCGM_FI_DEV_XID_ERRORS` is the last XID code (0 = none) with `err_code` and `err_msg` attributes.
Violation counters are nanoseconds spent throttled, grown by this process while the state's clocks-event
reasons say so. A reading the state marks unsupported or failing (`-`, `!`) is left out, as
dcgm-exporter skips a blank value; a lost GPU has no series; a state the fake NVML could not start on
(missing, `init` failing, GPU lines out of order) answers 500, so Prometheus records the target down.

    python -m opskit.live.fake_dcgm --state gpus.state --listen 127.0.0.1:0 --ready-file ready.json
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
import uuid as uuidlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opskit.live import fakenvml
from opskit.live.fakenvml import THROTTLE_HW_THERMAL, THROTTLE_POWER_CAP, THROTTLE_SW_THERMAL, FakeGpu

MIB = 1 << 20
RESERVED_MIB = 512        # framebuffer the driver keeps for itself: total = used + free + reserved
# name -> (type, help, value from a FakeGpu or None when absent, DCGM field type "i" or "d"); help texts
# as in default-counters.csv at catalog.DCGM_EXPORTER_VERSION.
_THERMAL = THROTTLE_SW_THERMAL | THROTTLE_HW_THERMAL
XID_MESSAGES = {0: "No Error", 13: "Graphics Engine Exception", 31: "GPU memory page fault",
                43: "GPU stopped processing", 48: "Double Bit ECC Error",
                63: "ECC page retirement or row remapping recording event",
                64: "ECC page retirement or row remapper recording failure", 74: "NVLINK Error",
                79: "GPU has fallen off the bus", 94: "Contained ECC error", 95: "Uncontained ECC error"}


def _num(v) -> int | None:
    return v if isinstance(v, int) else None


def _mib(g: FakeGpu, what: str) -> int | None:
    used, total = _num(g.mem_used), _num(g.mem_total)
    if used is None or total is None:
        return None
    return {"used": used // MIB, "free": max(0, total // MIB - used // MIB - RESERVED_MIB),
            "reserved": RESERVED_MIB}[what]


def _scaled(v, factor: float) -> float | None:
    n = _num(v)
    return None if n is None else n * factor


FIELDS = (
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", lambda g, v: _num(g.sm_clock_mhz), "i"),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", lambda g, v: _num(g.mem_clock_mhz), "i"),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", lambda g, v: _num(g.temp), "i"),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", lambda g, v: _scaled(g.power_mw, 1e-3), "d"),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ).",
     lambda g, v: _num(g.energy_mj), "i"),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries.",
     lambda g, v: _num(g.pcie_replays), "i"),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", lambda g, v: _num(g.util), "i"),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.",
     lambda g, v: None if g.xids is None else (g.xids[-1] if g.xids else 0), "i"),
    ("DCGM_FI_DEV_POWER_VIOLATION", "counter", "Throttling duration due to power constraints (in ns).",
     lambda g, v: v.get((g.uuid, "power")), "i"),
    ("DCGM_FI_DEV_THERMAL_VIOLATION", "counter", "Throttling duration due to thermal constraints (in ns).",
     lambda g, v: v.get((g.uuid, "thermal")), "i"),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", lambda g, v: _mib(g, "free"), "i"),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", lambda g, v: _mib(g, "used"), "i"),
    ("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB).",
     lambda g, v: _mib(g, "reserved"), "i"),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors.",
     lambda g, v: _num(g.ecc_volatile), "i"),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "counter", "Total number of double-bit persistent ECC errors.",
     lambda g, v: _num(g.ecc_aggregate), "i"),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for uncorrectable errors",
     lambda g, v: g.remapped_uncorrectable if _num(g.remapped_correctable) is not None else None, "i"),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for correctable errors",
     lambda g, v: _num(g.remapped_correctable), "i"),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed",
     lambda g, v: g.remap_failure if _num(g.remapped_correctable) is not None else None, "i"),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "Ratio of time the graphics engine is active.",
     lambda g, v: _scaled(g.util, 0.01), "d"),
)


class Violations:
    """Nanoseconds each GPU spent throttled, by reason, grown at each render from the state's reasons."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock, self.ns, self.last = clock, {}, None

    def update(self, gpus: list[FakeGpu]) -> dict[tuple[str, str], int]:
        now = self.clock()
        step = 0 if self.last is None else int((now - self.last) * 1e9)
        self.last = now
        for g in gpus:
            reasons = _num(g.clocks_event_reasons)
            if reasons is None:
                continue
            for why, bits in (("thermal", _THERMAL), ("power", THROTTLE_POWER_CAP)):
                key = (g.uuid, why)
                self.ns[key] = self.ns.get(key, 0) + (step if reasons & bits else 0)
        return dict(self.ns)


def _value(v: float, kind: str) -> str:
    return f"{int(v)}" if kind == "i" else f"{v:f}"


def render(driver: str, gpus: list[FakeGpu], hostname: str, pods: dict[str, tuple[str, str, str]],
           violations: dict[tuple[str, str], int]) -> str:
    """The /metrics text for these GPUs. `pods` maps a GPU index to (namespace, pod, container)."""
    out = []
    for name, kind, help_, get, dtype in FIELDS:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for g in gpus:
            value = None if g.lost else get(g, violations)
            if value is None:
                continue
            labels = (f'gpu="{g.index}",UUID="{g.uuid}",pci_bus_id="00000000:{g.index + 0x18:02X}:00.0",'
                      f'device="nvidia{g.index}",modelName="{g.name}",Hostname="{hostname}",'
                      f'DCGM_FI_DRIVER_VERSION="{driver}"')
            attrs = {}
            if name == "DCGM_FI_DEV_XID_ERRORS":
                attrs = {"err_code": str(int(value)), "err_msg": XID_MESSAGES.get(int(value), "Unknown Error")}
            if str(g.index) in pods:
                ns, pod, container = pods[str(g.index)]
                attrs |= {"pod": pod, "namespace": ns, "container": container,
                          "pod_uid": str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{ns}/{pod}"))}
            labels += "".join(f',{k}="{v}"' for k, v in sorted(attrs.items()))
            out.append(f"{name}{{{labels}}} {_value(value, dtype)}")
    return "\n".join(out) + "\n"


class Exporter:
    """Renders the state file at each scrape (a GET of /metrics)."""

    def __init__(self, state: Path, hostname: str, pods: dict[str, tuple[str, str, str]]) -> None:
        self.state, self.hostname, self.pods = state, hostname, pods
        self.violations = Violations()
        self.lock = threading.Lock()

    def metrics(self) -> tuple[int, str]:
        """(HTTP status, body)."""
        try:
            driver, gpus = fakenvml.read_state(self.state)
        except (fakenvml.StateError, ValueError, IndexError) as exc:
            return 500, f"failed to collect metrics: {exc}\n"
        with self.lock:
            violations = self.violations.update(gpus)
        return 200, render(driver, gpus, self.hostname, self.pods, violations)


def parse_pod(text: str) -> tuple[str, tuple[str, str, str]]:
    """`0=NAMESPACE/POD/CONTAINER` -> ("0", (namespace, pod, container))."""
    gpu, _, who = text.partition("=")
    parts = who.split("/")
    if not gpu or len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"--pod: expected GPU=NAMESPACE/POD/CONTAINER, got {text!r}")
    return gpu, (parts[0], parts[1], parts[2])


def main(argv: list[str] | None = None) -> None:
    """Serve /metrics until terminated."""
    from opskit.core import readyfile
    from opskit.core.cli_helpers import parse_hostport

    ap = argparse.ArgumentParser(prog="python -m opskit.live.fake_dcgm", description=__doc__.splitlines()[0])
    ap.add_argument("--state", required=True, type=Path, help="the fake NVML's state file")
    ap.add_argument("--listen", default="127.0.0.1:9400")
    ap.add_argument("--hostname", default=socket.gethostname())
    ap.add_argument("--pod", action="append", type=parse_pod, default=[], help="GPU=NAMESPACE/POD/CONTAINER")
    ap.add_argument("--ready-file", type=Path)
    args = ap.parse_args(argv)
    exporter = Exporter(args.state, args.hostname, dict(args.pod))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            status, body = exporter.metrics() if self.path == "/metrics" else (404, "not found\n")
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    try:
        host, port = parse_hostport(args.listen)
        server = ThreadingHTTPServer((host, port), Handler)
    except ValueError as exc:
        ap.error(str(exc))
    except OSError as exc:
        raise SystemExit(f"fake dcgm-exporter: cannot listen on {args.listen}: {exc.strerror or exc}") from None
    url = f"http://{host}:{server.server_address[1]}"
    if args.ready_file:
        import os

        readyfile.write(args.ready_file, {"url": url, "metrics_url": url + "/metrics", "pid": os.getpid()})
    server.serve_forever()


if __name__ == "__main__":
    main()
