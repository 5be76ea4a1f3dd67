"""MIG devices through the real pynvml binding, against the fake libnvidia-ml.so.1 (opskit/live/fakenvml):
each MIG device is a GPU of its own (gpu="<parent>:<slot>", its MIG UUID, its parent's UUID in
opskit_gpu_info), with the readings NVML gives a MIG device (memory) and none it does not."""

from __future__ import annotations

import ctypes

import pynvml
import pytest

from opskit.live.fakenvml import GIB, NOT_SUPPORTED, FakeMig, fake_gpus, mig_uuid_for, uuid_for, write_state
from opskit.sidecar import gpu
from tests.test_gpu import promtool_check

MEM_USED, MEM_TOTAL = "opskit_gpu_memory_used_bytes", "opskit_gpu_memory_total_bytes"



def mig_state(state, **gpu1):
    """GPU 0 whole; GPU 1 in MIG mode with MIG devices in slots 0 and 3 (slots 1, 2, 4-6 empty)."""
    gpus = fake_gpus(2, util=40, mem_used=2 * GIB)
    gpus[1].mig_mode = 1
    gpus[1].migs = (FakeMig(0, mig_uuid_for(1, 0), mem_used=3 * GIB, mem_total=10 * GIB),
                    FakeMig(3, mig_uuid_for(1, 3), name="NVIDIA H100 80GB HBM3 MIG 3g.40gb",
                            mem_used=39 * GIB, mem_total=40 * GIB))
    for k, v in gpu1.items():
        setattr(gpus[1], k, v)
    write_state(state, gpus)


def series(reg, name: str) -> dict[str, float]:
    return {s.labels["gpu"]: s.value for m in reg.collect() for s in m.samples if s.name == name}


def test_each_mig_device_is_a_gpu_with_its_parents_uuid(state, collect):
    mig_state(state)
    reg, c = collect()
    assert series(reg, MEM_USED) == {"0": 2 * GIB, "1": 2 * GIB, "1:0": 3 * GIB, "1:3": 39 * GIB}
    assert series(reg, MEM_TOTAL) == {"0": 80 * GIB, "1": 80 * GIB, "1:0": 10 * GIB, "1:3": 40 * GIB}
    info = {s.labels["gpu"]: s.labels for m in reg.collect() for s in m.samples if s.name == "opskit_gpu_info"}
    assert info["1:3"] == {"gpu": "1:3", "uuid": mig_uuid_for(1, 3), "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
                           "driver_version": "550.54.15", "parent_uuid": uuid_for(1)}
    assert info["1:0"]["parent_uuid"] == uuid_for(1) and info["1:0"]["uuid"] == mig_uuid_for(1, 0)
    assert info["0"]["parent_uuid"] == "" and info["1"]["parent_uuid"] == ""
    # Utilization: not per MIG device, and not for a MIG-enabled parent either (NVML does not give it).
    assert series(reg, "opskit_gpu_utilization_ratio") == {"0": 0.4}
    # Temperature, power and health stay on the parent GPU only.
    assert set(series(reg, "opskit_gpu_temperature_celsius")) == {"0", "1"}
    assert {g for g in series(reg, "opskit_gpu_clock_hertz")} == {"0", "1"}
    # Empty slots and unsupported readings are not errors.
    assert c.errors == {}
    promtool_check(reg)


def test_mig_devices_follow_the_state_and_a_board_without_mig_has_none(state, collect):
    mig_state(state)
    reg, _ = collect()
    assert set(series(reg, MEM_USED)) == {"0", "1", "1:0", "1:3"}
    mig_state(state, migs=(FakeMig(5, mig_uuid_for(1, 5)),))          # instances recreated
    assert set(series(reg, MEM_USED)) == {"0", "1", "1:5"}
    mig_state(state, mig_mode=0)                                       # MIG turned off
    assert set(series(reg, MEM_USED)) == {"0", "1"}
    assert series(reg, "opskit_gpu_utilization_ratio") == {"0": 0.4, "1": 0.4}
    mig_state(state, mig_mode=NOT_SUPPORTED)                           # a board without MIG
    assert set(series(reg, MEM_USED)) == {"0", "1"}
    mig_state(state, mig_mode="!")                                     # a failing MIG query: counted
    assert set(series(reg, MEM_USED)) == {"0", "1"}
    # once per scrape: this one and the one before
    assert reg.get_sample_value("opskit_gpu_collect_errors_total", {"reason": "unknown"}) == 2


def test_a_lost_parent_drops_its_mig_devices(state, collect):
    mig_state(state)
    reg, _ = collect()
    mig_state(state, lost=True)
    assert set(series(reg, MEM_USED)) == {"0"}
    assert reg.get_sample_value("opskit_gpu_collect_errors_total", {"reason": "gpu_is_lost"}) == 2  # 2 scrapes


@pytest.mark.parametrize("visible, expected", [
    ("1:3", {"1:3"}),                                   # one MIG device, as NVIDIA_VISIBLE_DEVICES=1:3
    (mig_uuid_for(1, 0), {"1:0"}),                      # a MIG UUID
    ("1", {"1", "1:0", "1:3"}),                         # the whole GPU: its MIG devices too
    (uuid_for(1), {"1", "1:0", "1:3"}),
    ("0", {"0"}),
])
def test_visible_devices_select_mig_devices(state, collect, visible, expected):
    mig_state(state)
    reg, _ = collect(visible=visible)
    assert set(series(reg, MEM_USED)) == expected
    assert set(series(reg, "opskit_gpu_info")) == expected


def test_fake_mig_handles_behave_as_nvml_documents(state, fake_nvml):
    """The fake's MIG API itself, through pynvml: what the collector relies on."""
    mig_state(state)
    gpu.load_library(str(fake_nvml))
    pynvml.nvmlInit()
    try:
        parent = pynvml.nvmlDeviceGetHandleByIndex(1)
        assert pynvml.nvmlDeviceGetMigMode(parent) == [1, 1]
        assert pynvml.nvmlDeviceGetMaxMigDeviceCount(parent) == 7
        with pytest.raises(pynvml.NVMLError) as err:
            pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 1)
        assert err.value.value == pynvml.NVML_ERROR_NOT_FOUND
        mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 3)
        assert pynvml.nvmlDeviceGetUUID(mig) == mig_uuid_for(1, 3)
        back = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)
        assert ctypes.cast(back, ctypes.c_void_p).value == ctypes.cast(parent, ctypes.c_void_p).value
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetUtilizationRates(mig)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetUtilizationRates(parent)
        assert pynvml.nvmlDeviceGetMaxMigDeviceCount(pynvml.nvmlDeviceGetHandleByIndex(0)) == 0
    finally:
        pynvml.nvmlShutdown()
