"""GPU health readings and XID events through the real pynvml binding, on the fake libnvidia-ml.so.1."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import generate_latest

from opskit.live.fakenvml import (
    NOT_SUPPORTED,
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_HW_THERMAL,
    THROTTLE_POWER_CAP,
    THROTTLE_SW_THERMAL,
    UNKNOWN_ERROR,
    fake_gpus,
    uuid_for,
    write_state,
)
from opskit.sidecar import gpu_health
from tests.test_gpu import promtool_check


def val(reg, metric: str, index: int, **labels) -> float | None:
    return reg.get_sample_value(metric, {"gpu": str(index), "uuid": uuid_for(index), **labels})


def wait_for(reg, metric: str, index: int, want: float, **labels) -> float | None:
    """Scrape until the XID thread has counted `want` (bounded: the fake delivers within ms)."""
    deadline = time.monotonic() + 10
    got = val(reg, metric, index, **labels)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.02)
        got = val(reg, metric, index, **labels)
    return got


def test_health_readings_and_their_units(state, collect):
    gpus = fake_gpus(2)
    gpus[0].sm_clock_mhz, gpus[0].mem_clock_mhz, gpus[0].energy_mj = 1410, 1593, 123_456_789
    gpus[0].pcie_replays, gpus[0].ecc_volatile, gpus[0].ecc_aggregate = 7, 1, 3
    gpus[0].remapped_correctable, gpus[0].remapped_uncorrectable = 2, 1
    gpus[0].remap_pending, gpus[0].remap_failure = 1, 0
    gpus[0].clocks_event_reasons = THROTTLE_HW_THERMAL | THROTTLE_POWER_CAP
    gpus[1].clocks_event_reasons = THROTTLE_SW_THERMAL | THROTTLE_HW_SLOWDOWN
    write_state(state, gpus)
    reg, c = collect()
    assert val(reg, "opskit_gpu_clock_hertz", 0, clock="sm") == 1.41e9
    assert val(reg, "opskit_gpu_clock_hertz", 0, clock="memory") == 1.593e9
    assert val(reg, "opskit_gpu_energy_joules_total", 0) == pytest.approx(123_456.789)
    assert val(reg, "opskit_gpu_pcie_replays_total", 0) == 7
    assert val(reg, "opskit_gpu_ecc_uncorrected_errors_total", 0, scope="volatile") == 1
    assert val(reg, "opskit_gpu_ecc_uncorrected_errors_total", 0, scope="aggregate") == 3
    assert val(reg, "opskit_gpu_remapped_rows", 0, cause="correctable") == 2
    assert val(reg, "opskit_gpu_remapped_rows", 0, cause="uncorrectable") == 1
    assert val(reg, "opskit_gpu_row_remap_pending", 0) == 1
    assert val(reg, "opskit_gpu_row_remap_failure", 0) == 0
    assert {r: val(reg, "opskit_gpu_clock_throttled", 0, reason=r) for r in ("thermal", "power", "hw_slowdown")} \
        == {"thermal": 1, "power": 1, "hw_slowdown": 0}
    assert {r: val(reg, "opskit_gpu_clock_throttled", 1, reason=r) for r in ("thermal", "power", "hw_slowdown")} \
        == {"thermal": 1, "power": 0, "hw_slowdown": 1}
    assert val(reg, "opskit_gpu_row_remap_pending", 1) == 0
    assert not c.errors
    promtool_check(reg)


def test_unsupported_health_readings_are_absent_failing_ones_counted(state, collect):
    gpus = fake_gpus(3)
    # A consumer board: no ECC, no row remapper, no energy counter, no XID events.
    gpus[0].ecc_volatile = gpus[0].ecc_aggregate = gpus[0].remapped_correctable = NOT_SUPPORTED
    gpus[0].energy_mj, gpus[0].xids = NOT_SUPPORTED, None
    gpus[1].clocks_event_reasons = UNKNOWN_ERROR
    gpus[2].lost = True
    write_state(state, gpus)
    reg, c = collect()
    for name, labels in (("opskit_gpu_ecc_uncorrected_errors_total", {"scope": "volatile"}),
                         ("opskit_gpu_remapped_rows", {"cause": "correctable"}),
                         ("opskit_gpu_row_remap_pending", {}), ("opskit_gpu_energy_joules_total", {})):
        assert val(reg, name, 0, **labels) is None, name
        assert val(reg, name, 1, **labels) is not None, name
    assert val(reg, "opskit_gpu_clock_hertz", 0, clock="sm") == 1.98e9
    assert val(reg, "opskit_gpu_clock_throttled", 1, reason="thermal") is None
    assert val(reg, "opskit_gpu_clock_throttled", 0, reason="thermal") == 0
    assert val(reg, "opskit_gpu_clock_hertz", 2, clock="sm") is None      # the lost GPU: nothing
    errors = {r: reg.get_sample_value("opskit_gpu_collect_errors_total", {"reason": r}) for r in c.errors}
    assert set(errors) == {"unknown", "gpu_is_lost"}                      # not_supported is no error
    promtool_check(reg)


def test_no_health_families_without_gpus(state, collect):
    write_state(state, [])
    reg, _ = collect()
    text = generate_latest(reg).decode()
    assert "opskit_gpu_up 1.0" in text
    assert not any(m.name in text for m in gpu_health.catalog.GPU_HEALTH)


def test_xid_events_are_counted_by_code_from_the_event_thread(state, collect):
    gpus = fake_gpus(2)
    gpus[0].xids = (13,)          # before the exporter started: not an event it saw
    write_state(state, gpus)
    reg, c = collect()
    assert val(reg, "opskit_gpu_utilization_ratio", 0) == 0     # first scrape registers the GPUs
    assert val(reg, "opskit_gpu_xid_errors_total", 0, xid="13") is None
    gpus[0].xids = (13, 79)
    gpus[1].xids = (48, 48, 5000)
    write_state(state, gpus)
    assert wait_for(reg, "opskit_gpu_xid_errors_total", 0, 1, xid="79") == 1
    assert wait_for(reg, "opskit_gpu_xid_errors_total", 1, 2, xid="48") == 2
    assert wait_for(reg, "opskit_gpu_xid_errors_total", 1, 1, xid="other") == 1   # bounded label
    assert val(reg, "opskit_gpu_xid_errors_total", 0, xid="13") is None
    gpus[0].xids = (13, 79, 79)
    write_state(state, gpus)
    assert wait_for(reg, "opskit_gpu_xid_errors_total", 0, 2, xid="79") == 2
    assert not c.errors
    promtool_check(reg)


def test_xid_counts_survive_a_lost_session_and_close_stops_the_thread(state, collect):
    gpus = fake_gpus(1)
    write_state(state, gpus)
    reg, c = collect(retry_s=0)
    assert val(reg, "opskit_gpu_utilization_ratio", 0) == 0
    gpus[0].xids = (79,)
    write_state(state, gpus)
    assert wait_for(reg, "opskit_gpu_xid_errors_total", 0, 1, xid="79") == 1
    # The driver goes away and comes back: a new session, a new listener, the count kept.
    state.unlink()
    assert reg.get_sample_value("opskit_gpu_up") == 0
    write_state(state, gpus)
    assert reg.get_sample_value("opskit_gpu_up") == 1
    assert val(reg, "opskit_gpu_xid_errors_total", 0, xid="79") == 1
    gpus[0].xids = (79, 94)
    write_state(state, gpus)
    assert wait_for(reg, "opskit_gpu_xid_errors_total", 0, 1, xid="94") == 1
    assert val(reg, "opskit_gpu_xid_errors_total", 0, xid="79") == 1
    c.close()
    deadline = time.monotonic() + 10
    while any(t.name == "opskit-nvml-xid" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "opskit-nvml-xid" for t in threading.enumerate())


def test_xid_label_is_bounded():
    assert [gpu_health.xid_label(x) for x in (79, 999, 1000, 0, -1)] == ["79", "999", "other", "other", "other"]
