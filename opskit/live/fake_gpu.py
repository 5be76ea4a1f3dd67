"""The tests' fake libnvidia-ml, for running the stack and the drill on a machine without a GPU.

The fake library and its builder ship in `opskit.live.fakenvml` (a C file built with gcc against the
`nvml.h` of the `nvidia-nvml-dev` wheel, where both are present); this module only reaches them. The exporter still goes through the real
binding path: pynvml loads the fake `libnvidia-ml.so.1` from LD_LIBRARY_PATH and reads GPU values
from the JSON state file named by $FAKE_NVML_STATE, which the drill rewrites to inject load.
"""

from __future__ import annotations

from pathlib import Path

STATE_ENV = "FAKE_NVML_STATE"
# The fake dcgm-exporter (opskit.live.fake_dcgm) attributes the fake GPU to a pod, as dcgm-exporter's
# Kubernetes mapping does, so the dcgm source's pod/namespace labels are exercised too.
DCGM_POD = ("llm", "vllm-0", "vllm")
DCGM_FLAGS = ("--pod", f"0={'/'.join(DCGM_POD)}")


class FakeGpuUnavailable(Exception):
    """The fake NVML cannot be used here (no C compiler, no nvml.h); one-line message."""


def _builder():
    from opskit.live import fakenvml

    return fakenvml


def unavailable_reason() -> str | None:
    """Why the fake NVML cannot be built here (no gcc, no nvml.h), or None."""
    import shutil

    try:
        mod = _builder()
        mod.find_nvml_header()
    except (FakeGpuUnavailable, FileNotFoundError) as exc:
        return str(exc)
    if not (shutil.which("gcc") or shutil.which("cc")):
        return "no C compiler (gcc) to build the fake NVML"
    return None


def prepare(dest: Path, utilization: float = 0.2) -> tuple[Path, Path]:
    """Build the fake library into `dest` and write an initial state: (library dir, state file)."""
    mod = _builder()
    try:
        lib = Path(mod.build_fake_nvml(dest))
    except Exception as exc:  # no gcc, no nvml.h: reported in one line, not as a traceback
        raise FakeGpuUnavailable(f"cannot build the fake NVML: {exc}") from None
    state = dest / "gpus.state"
    set_utilization(state, utilization)
    return lib.parent, state


def set_utilization(state: Path, utilization: float) -> None:
    """Rewrite the state file so that the (single, otherwise healthy) fake GPU is `utilization` busy."""
    set_gpu(state, util=round(utilization * 100))


def set_gpu(state: Path, **fields) -> None:
    """Rewrite the state file: one healthy fake GPU (20 % busy, 20 of 80 GiB used) with `fields`
    changed, e.g. util=95, power_mw="!" (that NVML query fails) or index=1; see opskit/live/fakenvml."""
    mod = _builder()
    index = fields.pop("index", 0)  # 1 alone: a gap, so NVML cannot count the devices
    values = {"util": 20, "mem_used": 20 * mod.GIB, **fields}
    mod.write_state(state, [mod.FakeGpu(index=index, uuid=mod.uuid_for(index), **values)])
