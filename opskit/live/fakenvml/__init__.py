"""A fake NVIDIA Management Library for tests, loaded by the real pynvml binding.

`build_fake_nvml(dest_dir)` compiles `fake_nvml.c` with gcc into `dest_dir/libnvidia-ml.so.1`;
point a process at it with `LD_LIBRARY_PATH=dest_dir` at its start (or `opskit exporter --nvml-lib`).
The GPUs it reports come from the state file named by `$FAKE_NVML_STATE`, which `write_state()`
writes atomically and may rewrite between scrapes; the format is documented in fake_nvml.c.

    lib = build_fake_nvml(tmp)
    write_state(tmp / "gpus", fake_gpus(8))                     # 8 idle H100s
    write_state(tmp / "gpus", fake_gpus(2, util=95))            # now 2 at 95 %
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib.parent), "FAKE_NVML_STATE": str(tmp / "gpus")}
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIB_NAME = "libnvidia-ml.so.1"
STATE_ENV = "FAKE_NVML_STATE"
NOT_SUPPORTED = "-"     # a field value: that query returns NVML_ERROR_NOT_SUPPORTED
UNKNOWN_ERROR = "!"     # a field value: that query returns NVML_ERROR_UNKNOWN
GIB = 1 << 30
# NVML clocks-event-reason bits (nvml.h nvmlClocksEventReason*), for FakeGpu.clocks_event_reasons.
THROTTLE_POWER_CAP = 0x4
THROTTLE_HW_SLOWDOWN = 0x8
THROTTLE_SW_THERMAL = 0x20
THROTTLE_HW_THERMAL = 0x40

Field = int | str
MIG_SLOTS = 7           # MIG device slots of a MIG-enabled fake GPU (nvmlDeviceGetMaxMigDeviceCount)


@dataclass
class FakeMig:
    """One MIG device of a fake GPU, in MIG slot `slot` (0..MIG_SLOTS-1)."""

    slot: int
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    mem_used: int = 1 * GIB
    mem_total: int = 10 * GIB


@dataclass
class FakeGpu:
    """One fake GPU. Numeric fields may be NOT_SUPPORTED, UNKNOWN_ERROR or "!<nvml code>"."""

    index: int
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    util: Field = 0         # percent busy
    mem_used: Field = 1 * GIB
    mem_total: Field = 80 * GIB
    temp: Field = 40        # celsius
    power_mw: Field = 100_000
    lost: bool = False
    # Health readings (fake_nvml.c documents them): clocks in MHz, energy in mJ since the driver
    # loaded, NVML's clocks-event-reasons bitmask (THROTTLE_*), and the XID codes the GPU has had,
    # oldest first (None: the GPU does not support XID events).
    sm_clock_mhz: Field = 1980
    mem_clock_mhz: Field = 2619
    energy_mj: Field = 1_000_000
    pcie_replays: Field = 0
    ecc_volatile: Field = 0         # uncorrectable ECC errors since the driver loaded
    ecc_aggregate: Field = 0        # ... over the GPU's life
    remapped_correctable: Field = 0  # also carries the error of the whole remapped-rows query
    remapped_uncorrectable: int = 0
    remap_pending: int = 0
    remap_failure: int = 0
    clocks_event_reasons: Field = 0
    xids: tuple[int, ...] | None = ()
    # MIG: mig_mode 1 = enabled (utilization then unsupported), NOT_SUPPORTED = a board without MIG;
    # `migs` the MIG devices that exist (only with mig_mode 1).
    mig_mode: Field = 0
    migs: tuple[FakeMig, ...] = ()

    def lines(self) -> list[str]:
        """The GPU's line and its MIG devices' lines."""
        return [self.line(), *(f"mig {self.index} {m.slot} {m.uuid} {m.name.replace(' ', '_')} {m.mem_used} "
                               f"{m.mem_total}" for m in self.migs)]

    def line(self) -> str:
        fields = (self.util, self.mem_used, self.mem_total, self.temp, self.power_mw, int(self.lost),
                  self.sm_clock_mhz, self.mem_clock_mhz, self.energy_mj, self.pcie_replays, self.ecc_volatile,
                  self.ecc_aggregate, self.remapped_correctable, self.remapped_uncorrectable, self.remap_pending,
                  self.remap_failure, self.clocks_event_reasons)
        xids = "-" if self.xids is None else ",".join(map(str, self.xids)) or "."
        return " ".join([str(self.index), self.uuid, self.name.replace(" ", "_"), *map(str, fields), xids,
                         str(self.mig_mode)])


def uuid_for(index: int) -> str:
    """A stable, well-formed GPU UUID for a fake GPU index."""
    return f"GPU-00000000-0000-0000-0000-{index:012d}"


def mig_uuid_for(index: int, slot: int) -> str:
    """A stable, well-formed MIG device UUID for MIG slot `slot` of fake GPU `index`."""
    return f"MIG-00000000-0000-0000-{index:04d}-{slot:012d}"


def fake_gpus(n: int, **fields) -> list[FakeGpu]:
    """`n` fake GPUs with indexes 0..n-1, each with the given field values."""
    return [FakeGpu(index=i, uuid=uuid_for(i), **fields) for i in range(n)]


def find_nvml_header() -> Path:
    """nvml.h from the nvidia-nvml-dev wheel (the `dev` extra)."""
    site = Path(sysconfig.get_paths()["purelib"])
    found = sorted(site.glob("nvidia/*/include/nvml.h"))
    if not found:
        raise FileNotFoundError(f"nvml.h not found under {site}/nvidia/*/include (pip install -e '.[dev]')")
    return found[-1]


def build_fake_nvml(dest_dir: str | os.PathLike[str]) -> Path:
    """Compile the fake library into `dest_dir/libnvidia-ml.so.1` and return its path."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise FileNotFoundError("gcc not found (apt-get install gcc)")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / LIB_NAME
    cmd = [gcc, "-shared", "-fPIC", "-O2", "-pthread", "-Wno-deprecated-declarations",
           f"-I{find_nvml_header().parent}", "-o", str(out), str(SOURCE)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return out


def write_state(path: str | os.PathLike[str], gpus: Iterable[FakeGpu], driver: str = "550.54.15",
                init_code: int = 0) -> Path:
    """Write the fake's state file atomically (temp file + rename), so a reader never sees half."""
    path = Path(path)
    lines = [f"driver {driver}", f"init {init_code}", *(line for g in gpus for line in g.lines())]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


_NUMERIC = ("util", "mem_used", "mem_total", "temp", "power_mw", "lost", "sm_clock_mhz", "mem_clock_mhz",
            "energy_mj", "pcie_replays", "ecc_volatile", "ecc_aggregate", "remapped_correctable",
            "remapped_uncorrectable", "remap_pending", "remap_failure", "clocks_event_reasons")


class StateError(ValueError):
    """The state file is missing, unreadable or malformed (what makes the fake NVML fail to start)."""


def read_state(path: str | os.PathLike[str]) -> tuple[str, list[FakeGpu]]:
    """(driver version, GPUs) from a state file, as fake_nvml.c reads it (for other fakes that share
    it, such as opskit.live.fake_dcgm). Fields that are errors stay strings ("-", "!", "!<code>").
    Raises StateError where the fake NVML would fail to initialise or to count its GPUs."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
    driver, gpus = "999.99", []
    for raw in text.splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "driver" and len(words) > 1:
            driver = words[1]
        elif words[0] == "init":
            if len(words) > 1 and words[1] != "0":
                raise StateError(f"NVML initialisation fails with code {words[1]}")
        elif words[0] == "mig":
            parent, slot, uuid, name, used, total = words[1:7]
            gpus[int(parent)].migs += (FakeMig(int(slot), uuid, name.replace("_", " "), int(used), int(total)),)
        else:
            gpus.append(_parse_gpu(words, len(gpus)))
    return driver, gpus


def _parse_gpu(words: list[str], expected: int) -> FakeGpu:
    if int(words[0]) != expected:
        raise StateError(f"GPU lines out of order: {words[0]} where {expected} was due")

    def num(tok: str) -> Field:
        return tok if tok.startswith(("-", "!")) else int(tok)

    values = dict(zip(_NUMERIC, (num(t) for t in words[3:3 + len(_NUMERIC)]), strict=False))
    values["lost"] = bool(values.get("lost", 0))
    rest = words[3 + len(_NUMERIC):]
    xids: tuple[int, ...] | None = ()
    if rest and rest[0] == "-":
        xids = None
    elif rest and rest[0] != ".":
        xids = tuple(int(x) for x in rest[0].split(","))
    mig = num(rest[1]) if len(rest) > 1 else 0
    return FakeGpu(index=expected, uuid=words[1], name=words[2].replace("_", " "), xids=xids, mig_mode=mig,
                   **values)
