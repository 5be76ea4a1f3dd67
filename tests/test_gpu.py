"""GpuCollector through the real pynvml binding, against the fake libnvidia-ml.so.1 (opskit/live/fakenvml)."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from opskit.live.fakenvml import GIB, NOT_SUPPORTED, UNKNOWN_ERROR, fake_gpus, uuid_for, write_state
from opskit.sidecar import gpu
from tests.conftest import need_binary


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now



def val(reg: CollectorRegistry, metric: str, index: int | None = None, **labels) -> float | None:
    if index is not None:
        labels = {"gpu": str(index), "uuid": uuid_for(index), **labels}
    return reg.get_sample_value(metric, labels)


def promtool_check(reg: CollectorRegistry) -> None:
    """`promtool check metrics` must report nothing on the exposition."""
    promtool = need_binary("promtool")
    out = subprocess.run([promtool, "check", "metrics"], input=generate_latest(reg),
                         capture_output=True, timeout=30)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


@pytest.mark.parametrize("value, expected", [
    (None, None), ("all", None), ("ALL", None), ("", frozenset()), ("none", frozenset()),
    ("void", frozenset()), ("0,2", frozenset({"0", "2"})), (" 1 , GPU-ab ", frozenset({"1", "GPU-ab"})),
])
def test_parse_visible(value, expected):
    assert gpu.parse_visible(value) == expected


def test_visible_from_env_prefers_container_runtime_variable():
    assert gpu.visible_from_env({"NVIDIA_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "0"}) == "1"
    assert gpu.visible_from_env({"CUDA_VISIBLE_DEVICES": "0"}) == "0"
    assert gpu.visible_from_env({}) is None
    assert gpu.is_visible(frozenset({"GPU-0000"}), 5, uuid_for(5))   # unique UUID prefix, as CUDA allows
    assert not gpu.is_visible(frozenset({"1"}), 5, uuid_for(5))


def test_two_gpus_values_and_changes_between_scrapes(state, collect):
    write_state(state, fake_gpus(2, util=37, mem_used=3 * GIB, temp=55, power_mw=250_500), driver="550.54.15")
    reg, _ = collect()
    assert val(reg, "opskit_gpu_up") == 1
    assert val(reg, "opskit_gpu_utilization_ratio", 1) == pytest.approx(0.37)
    assert val(reg, "opskit_gpu_memory_used_bytes", 0) == 3 * GIB
    assert val(reg, "opskit_gpu_memory_total_bytes", 0) == 80 * GIB
    assert val(reg, "opskit_gpu_temperature_celsius", 1) == 55
    assert val(reg, "opskit_gpu_power_watts", 0) == pytest.approx(250.5)
    assert val(reg, "opskit_gpu_info", 0, name="NVIDIA H100 80GB HBM3", driver_version="550.54.15",
               parent_uuid="") == 1
    assert val(reg, "opskit_gpu_utilization_ratio", 2) is None

    gpus = fake_gpus(2, util=37)
    gpus[1].util = 95
    write_state(state, gpus)
    assert val(reg, "opskit_gpu_utilization_ratio", 1) == pytest.approx(0.95)
    assert val(reg, "opskit_gpu_utilization_ratio", 0) == pytest.approx(0.37)
    promtool_check(reg)


def test_eight_gpus(state, collect):
    write_state(state, fake_gpus(8, util=10))
    reg, _ = collect()
    for i in range(8):
        assert val(reg, "opskit_gpu_utilization_ratio", i) == pytest.approx(0.10)
    assert val(reg, "opskit_gpu_utilization_ratio", 8) is None


def test_gpu_lost_mid_run_drops_only_its_series_and_counts(state, collect, caplog):
    gpus = fake_gpus(3, util=50)
    write_state(state, gpus)
    reg, _ = collect()
    assert val(reg, "opskit_gpu_utilization_ratio", 1) == pytest.approx(0.5)
    gpus[1].lost = True
    write_state(state, gpus)
    with caplog.at_level(logging.INFO, logger="opskit.sidecar.gpu"):
        for _ in range(2):
            assert val(reg, "opskit_gpu_utilization_ratio", 1) is None
    assert val(reg, "opskit_gpu_info", 1, name="NVIDIA H100 80GB HBM3", driver_version="550.54.15") is None
    assert val(reg, "opskit_gpu_utilization_ratio", 0) == pytest.approx(0.5)
    assert val(reg, "opskit_gpu_power_watts", 2) == 100
    assert val(reg, "opskit_gpu_up") == 1
    # Counted at every scrape it stays lost, logged once.
    assert val(reg, "opskit_gpu_collect_errors_total", reason="gpu_is_lost") >= 2
    assert sum("GPU 1 dropped" in r.message for r in caplog.records) == 1
    promtool_check(reg)

    gpus[1].lost = False
    write_state(state, gpus)
    assert val(reg, "opskit_gpu_utilization_ratio", 1) == pytest.approx(0.5)


def test_unsupported_field_is_absent_and_failing_field_is_counted(state, collect):
    gpus = fake_gpus(2, util=20)
    gpus[0].power_mw = NOT_SUPPORTED
    gpus[1].temp = UNKNOWN_ERROR
    write_state(state, gpus)
    reg, c = collect()
    assert val(reg, "opskit_gpu_power_watts", 0) is None
    assert val(reg, "opskit_gpu_temperature_celsius", 0) == 40
    assert val(reg, "opskit_gpu_temperature_celsius", 1) is None
    assert val(reg, "opskit_gpu_power_watts", 1) == 100
    assert val(reg, "opskit_gpu_utilization_ratio", 1) == pytest.approx(0.2)
    assert val(reg, "opskit_gpu_collect_errors_total", reason="unknown") >= 1
    assert "not_supported" not in c.errors   # a capability, not an error
    promtool_check(reg)


def test_visible_devices_select_by_index_and_uuid(state, collect):
    write_state(state, fake_gpus(4, util=1))
    reg, _ = collect(visible=f"1,{uuid_for(3)}")
    present = [i for i in range(4) if val(reg, "opskit_gpu_utilization_ratio", i) is not None]
    assert present == [1, 3]
    reg, _ = collect(visible="none")
    assert val(reg, "opskit_gpu_up") == 1
    assert all(val(reg, "opskit_gpu_utilization_ratio", i) is None for i in range(4))
    promtool_check(reg)


def test_visible_devices_matching_no_gpu_are_logged_once(state, collect, caplog):
    write_state(state, fake_gpus(2, util=1))
    with caplog.at_level(logging.INFO, logger="opskit.sidecar.gpu"):
        reg, _ = collect(visible="GPU-ffff,5")  # a stale UUID and an index this node does not have
        for _ in range(3):
            assert val(reg, "opskit_gpu_up") == 1 and val(reg, "opskit_gpu_utilization_ratio", 0) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["no GPU series: the visible-devices list 'GPU-ffff,5' (NVIDIA_VISIBLE_DEVICES or "
                        "CUDA_VISIBLE_DEVICES) matches none of the 2 GPU(s) NVML sees"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="opskit.sidecar.gpu"):
        for visible in ("1", "none"):  # one GPU matches; none is asked for: nothing to warn about
            reg, _ = collect(visible=visible)
            val(reg, "opskit_gpu_up")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_invisible_lost_gpu_is_not_ours_to_count(state, collect):
    gpus = fake_gpus(2)
    gpus[0].lost = True
    write_state(state, gpus)
    reg, c = collect(visible="1")
    assert val(reg, "opskit_gpu_temperature_celsius", 1) == 40
    assert c.errors == {}


def test_gpu_selected_by_uuid_others_lost_later_are_not_counted(state, collect):
    gpus = fake_gpus(3)
    write_state(state, gpus)
    reg, c = collect(visible=uuid_for(2))
    assert [val(reg, "opskit_gpu_temperature_celsius", i) for i in range(3)] == [None, None, 40]
    gpus[0].lost = True            # another pod's GPU falls off the bus
    write_state(state, gpus)
    assert val(reg, "opskit_gpu_temperature_celsius", 2) == 40
    assert c.errors == {}
    gpus[2].lost = True            # ours does: counted
    write_state(state, gpus)
    assert val(reg, "opskit_gpu_temperature_celsius", 2) is None
    assert c.errors == {"gpu_is_lost": 1}


def test_no_library_gpu_absent_up_zero_one_log_and_rate_limited_retry(tmp_path, state, fake_nvml, collect,
                                                                      caplog):
    write_state(state, fake_gpus(2, util=60))
    lib = tmp_path / "later" / "libnvidia-ml.so.1"   # the driver appears later
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="opskit.sidecar.gpu"):
        reg, c = collect(lib_path=str(lib), retry_s=30, clock=clock)
        for _ in range(3):
            assert val(reg, "opskit_gpu_up") == 0
        assert val(reg, "opskit_gpu_utilization_ratio", 0) is None
        assert c.errors == {}           # no GPU on this machine is not an error
        promtool_check(reg)
        lib.parent.mkdir()
        shutil.copy(fake_nvml, lib)
        clock.now += 10
        assert val(reg, "opskit_gpu_up") == 0   # not retried yet: rate-limited
        clock.now += 25
        assert val(reg, "opskit_gpu_up") == 1
        assert val(reg, "opskit_gpu_utilization_ratio", 1) == pytest.approx(0.6)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "library_not_found" in warnings[0].message


def test_driver_not_loaded_is_counted_and_up_zero(state, collect):
    write_state(state, fake_gpus(2), init_code=9)   # NVML_ERROR_DRIVER_NOT_LOADED
    clock = Clock()
    reg, _ = collect(clock=clock, retry_s=5)
    assert val(reg, "opskit_gpu_up") == 0
    assert val(reg, "opskit_gpu_collect_errors_total", reason="driver_not_loaded") == 1
    promtool_check(reg)
    write_state(state, fake_gpus(2, util=5))
    clock.now += 6
    assert val(reg, "opskit_gpu_up") == 1
    assert val(reg, "opskit_gpu_utilization_ratio", 0) == pytest.approx(0.05)


def test_driver_level_failure_mid_run_sets_up_zero(state, collect):
    write_state(state, fake_gpus(2))
    reg, _ = collect()
    assert val(reg, "opskit_gpu_up") == 1
    state.write_text("driver 1.0\n0 GPU-a x 1 1 1 1 1 0\n5 GPU-b x 1 1 1 1 1 0\n")  # index gap: count fails
    assert val(reg, "opskit_gpu_up") == 0
    assert val(reg, "opskit_gpu_temperature_celsius", 0) is None
    assert val(reg, "opskit_gpu_collect_errors_total", reason="unknown") >= 1
    promtool_check(reg)


def test_registering_twice_is_refused_without_touching_nvml(tmp_path, caplog):
    reg = CollectorRegistry()
    with caplog.at_level(logging.INFO, logger="opskit.sidecar.gpu"):
        reg.register(gpu.GpuCollector(lib_path=str(tmp_path / "absent.so")))
        with pytest.raises(ValueError, match="opskit_gpu_up"):
            reg.register(gpu.GpuCollector(lib_path=str(tmp_path / "absent.so")))
    assert not caplog.records   # describe() did not try nvmlInit (which would log the missing library)


def test_reason_names_are_short_snake_case():
    import pynvml

    assert gpu.REASONS[pynvml.NVML_ERROR_GPU_IS_LOST] == "gpu_is_lost"
    assert gpu.REASONS[pynvml.NVML_ERROR_NOT_SUPPORTED] == "not_supported"
    assert gpu.reason(pynvml.NVMLError(12345)) == "unknown"
    assert gpu.reason(ValueError()) == "unknown"
