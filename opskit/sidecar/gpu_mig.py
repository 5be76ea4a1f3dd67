"""MIG devices through NVML: where a GPU runs in MIG mode, each MIG device is a GPU of its own.

Split from opskit.sidecar.gpu, which owns the NVML session and the failure policy; this module only
knows how NVML enumerates MIG devices. A MIG device's series carry `gpu="<parent index>:<slot>"`
(the `<GPU>:<MIG>` form NVIDIA's container toolkit accepts in NVIDIA_VISIBLE_DEVICES) and its own
`MIG-...` UUID; `opskit_gpu_info` names its parent's UUID (`parent_uuid`). NVML gives a MIG device
its memory but not its utilization, temperature, power or health, which are the parent GPU's and stay
on the parent's series (the parent's utilization is not supported while MIG is on: absent).

Failure policy: a MIG query the board does not support means no MIG devices (not counted); an empty
MIG slot is not an error; a MIG device that fails (destroyed between two calls) is left out of this
scrape and its reason counted; a parent that is lost raises, so gpu.py drops the whole GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pynvml

from opskit.core.records import GpuSample

# Errors on a MIG device that mean its parent GPU (or the session) is gone: the caller drops the GPU.
_PARENT_ERRORS = frozenset({
    pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED, pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
})
_ABSENT = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NOT_FOUND})


def label(index: int | str, slot: int) -> str:
    """The `gpu` label of MIG slot `slot` of GPU `index`."""
    return f"{index}:{slot}"


def selects_mig(selectors: frozenset[str] | None, index: int) -> bool:
    """Whether a *_VISIBLE_DEVICES selection may name a MIG device of GPU `index` (`0:1`, `MIG-...`)."""
    return selectors is None or any(s.startswith((f"{index}:", "MIG-")) for s in selectors)


def mig_visible(selectors: frozenset[str] | None, gpu: str, uuid: str) -> bool:
    """Whether the MIG device with this `gpu` label and UUID is selected (a unique UUID prefix matches)."""
    return selectors is None or gpu in selectors or any(s.startswith("MIG-") and uuid.startswith(s)
                                                        for s in selectors)


class MigReader:
    """Reads the MIG devices of one GPU at a time. `count(reason)` counts an error."""

    def __init__(self, reason: Callable[[BaseException], str], count: Callable[[str], None]) -> None:
        self._reason, self._count = reason, count

    def _call(self, fn: Callable[[], object]) -> object | None:
        try:
            return fn()
        except pynvml.NVMLError as exc:
            if exc.value in _PARENT_ERRORS:
                raise
            if exc.value not in _ABSENT:
                self._count(self._reason(exc))
            return None

    def read(self, handle: object, index: int, parent_uuid: str,
             selectors: frozenset[str] | None) -> list[GpuSample]:
        """The selected MIG devices of the GPU at `handle` (none when MIG is off or unsupported)."""
        mode = self._call(lambda: pynvml.nvmlDeviceGetMigMode(handle))
        if not mode or mode[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
            return []
        slots = self._call(lambda: pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)) or 0
        out = []
        for slot in range(int(slots)):
            mig = self._call(lambda slot=slot: pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
            if mig is None:
                continue  # an empty slot
            uuid = self._call(lambda mig=mig: pynvml.nvmlDeviceGetUUID(mig))
            name = self._call(lambda mig=mig: pynvml.nvmlDeviceGetName(mig))
            gpu = label(index, slot)
            if uuid is None or name is None or not mig_visible(selectors, gpu, str(uuid)):
                continue
            mem = self._call(lambda mig=mig: pynvml.nvmlDeviceGetMemoryInfo(mig))
            out.append(GpuSample(index=gpu, uuid=str(uuid), name=str(name), utilization_ratio=None,
                                 memory_used_bytes=None if mem is None else float(mem.used),
                                 memory_total_bytes=None if mem is None else float(mem.total),
                                 temperature_celsius=None, power_watts=None, parent_uuid=parent_uuid))
        return out
