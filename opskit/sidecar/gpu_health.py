"""GPU health through NVML: the readings that predict a failing GPU, and the XID event listener.

Split from opskit.sidecar.gpu along one seam: gpu.py owns the NVML session, the devices and the failure
policy; this module only knows which NVML calls make a health reading and how XID events arrive.
With gpu_mig (MIG devices) they are the only modules that import pynvml.

Readings are taken at scrape time like the others, through the `field` callable gpu.py passes in
(its failure policy: unsupported = absent and not counted, an error = absent and counted, a lost GPU
= the whole GPU dropped). XIDs are events, not readings: `XidWatcher` waits on NVML's event API in
one daemon thread and only adds to a dict of counts; a scrape reads that dict under a lock held for
a copy, so a slow or stuck event wait never holds up a scrape.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pynvml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from opskit.core import catalog

log = logging.getLogger("opskit.sidecar.gpu")

Field = Callable[[Callable[[], float]], float | None]

# catalog.THROTTLE_REASONS -> NVML clocks-event-reason bits that mean it.
THROTTLE_BITS = {
    "thermal": pynvml.nvmlClocksEventReasonSwThermalSlowdown | pynvml.nvmlClocksEventReasonHwThermalSlowdown,
    "power": pynvml.nvmlClocksEventReasonSwPowerCap,
    "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown | pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
}
CLOCKS = (("sm", pynvml.NVML_CLOCK_SM), ("memory", pynvml.NVML_CLOCK_MEM))
ECC_SCOPES = (("volatile", pynvml.NVML_VOLATILE_ECC), ("aggregate", pynvml.NVML_AGGREGATE_ECC))
MAX_XID = 999            # an `xid` label above this is "other": the label set stays bounded
WAIT_MS = 500            # one event wait; also how long stop() may take


@dataclass
class Health:
    """One GPU's health readings; a reading the GPU does not give is absent (None or no key)."""

    clocks_hz: dict[str, float] = field(default_factory=dict)
    energy_joules: float | None = None
    pcie_replays: float | None = None
    ecc_uncorrected: dict[str, float] = field(default_factory=dict)
    remapped_rows: dict[str, float] = field(default_factory=dict)
    remap_pending: float | None = None
    remap_failure: float | None = None
    throttled: dict[str, float] = field(default_factory=dict)


def _event_reasons(handle: object) -> int:
    try:
        return pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
    except pynvml.NVMLError_FunctionNotFound:  # drivers before r535 know only the old name
        return pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)


def read_health(handle: object, read: Field) -> Health:
    """The health readings of one GPU, each through `read` (gpu.py's failure policy)."""
    h = Health()
    for name, clock in CLOCKS:
        mhz = read(lambda clock=clock: pynvml.nvmlDeviceGetClockInfo(handle, clock))
        if mhz is not None:
            h.clocks_hz[name] = mhz * 1e6
    mj = read(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    h.energy_joules = None if mj is None else mj / 1000.0
    h.pcie_replays = read(lambda: pynvml.nvmlDeviceGetPcieReplayCounter(handle))
    for scope, counter in ECC_SCOPES:
        n = read(lambda counter=counter: pynvml.nvmlDeviceGetTotalEccErrors(
            handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, counter))
        if n is not None:
            h.ecc_uncorrected[scope] = float(n)
    rows = read(lambda: pynvml.nvmlDeviceGetRemappedRows(handle))
    if rows is not None:
        corr, unc, pending, failure = rows
        h.remapped_rows = {"correctable": float(corr), "uncorrectable": float(unc)}
        h.remap_pending, h.remap_failure = float(bool(pending)), float(bool(failure))
    reasons = read(lambda: _event_reasons(handle))
    if reasons is not None:
        h.throttled = {name: float(bool(int(reasons) & bits)) for name, bits in THROTTLE_BITS.items()}
    return h


def xid_label(code: int) -> str:
    """The `xid` label of an XID code, bounded (NVIDIA's codes are well under MAX_XID)."""
    return str(code) if 0 < code <= MAX_XID else "other"


class XidWatcher:
    """Counts XID events of the registered GPUs in one daemon thread (NVML's event API).

    `register(index, uuid, handle)` is called by a scrape for each GPU it reads (cheap once done);
    `counts()` is what the scrape exports. A GPU whose board or driver has no XID events is left out
    (its family absent). The thread stops at `stop()` or when NVML's session ends under it.
    """

    def __init__(self, reason: Callable[[BaseException], str]) -> None:
        self._reason = reason
        self._lock = threading.Lock()     # guards the fields below; never held across an NVML call
        self._counts: dict[tuple[str, str, str], float] = {}
        self.errors: dict[str, float] = {}  # NVML errors of the event API, by reason (read with counts())
        self._by_handle: dict[int, tuple[str, str]] = {}
        self._tried: set[str] = set()     # UUIDs already registered (or refused)
        self._set = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, index: int, uuid: str, handle: object) -> None:
        """Listen to this GPU's XID events (once per GPU and NVML session)."""
        if uuid in self._tried:
            return
        self._tried.add(uuid)
        try:
            if self._set is None:
                self._set = pynvml.nvmlEventSetCreate()
            pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, self._set)
        except pynvml.NVMLError as exc:
            if exc.value != pynvml.NVML_ERROR_NOT_SUPPORTED:
                self._count_error(self._reason(exc))
                log.warning("XID events of GPU %d unavailable: %s", index, self._reason(exc))
            return
        with self._lock:
            self._by_handle[_address(handle)] = (str(index), uuid)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="opskit-nvml-xid", daemon=True)
            self._thread.start()

    def counts(self) -> tuple[dict[tuple[str, str, str], float], dict[str, float]]:
        """((gpu, uuid, xid) -> XIDs seen since the exporter started, reason -> event API errors)."""
        with self._lock:
            return dict(self._counts), dict(self.errors)

    def _count_error(self, why: str) -> None:
        with self._lock:
            self.errors[why] = self.errors.get(why, 0) + 1

    def stop(self, join: bool = False) -> None:
        """Stop listening; the thread frees the event set as it ends (within WAIT_MS). `join` waits
        for that, as a clean shutdown must before nvmlShutdown; a scrape that lost its session does not."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            self._free()
        elif join:
            thread.join(timeout=WAIT_MS / 1000 * 4)

    def _free(self) -> None:
        event_set, self._set = self._set, None
        if event_set is not None:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlEventSetFree(event_set)

    def _run(self) -> None:
        try:
            self._listen()
        finally:
            self._free()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = pynvml.nvmlEventSetWait_v2(self._set, WAIT_MS)
            except pynvml.NVMLError as exc:
                if exc.value == pynvml.NVML_ERROR_TIMEOUT:
                    continue
                self._count_error(self._reason(exc))
                if exc.value in (pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED):
                    return  # the session ended; the collector starts a new watcher with the next one
                self._stop.wait(WAIT_MS / 1000)  # don't spin on a persistent error
                continue
            if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                self._add(data.device, int(data.eventData))

    def _add(self, handle: object, code: int) -> None:
        with self._lock:
            gpu = self._by_handle.get(_address(handle))
            if gpu is None:
                return
            key = (*gpu, xid_label(code))
            self._counts[key] = self._counts.get(key, 0) + 1
        log.warning("GPU %s reported XID %d", gpu[0], code)


def _address(handle: object) -> int:
    """A device handle (a ctypes pointer) as a plain, hashable address."""
    import ctypes

    return ctypes.cast(handle, ctypes.c_void_p).value or 0


def families(samples: list[tuple[str, str, Health]], xids: dict[tuple[str, str, str], float]) -> Iterator[Metric]:
    """Metric families for the health readings; a family with no samples is left out."""
    def gauge(metric: catalog.Metric) -> GaugeMetricFamily:
        return GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)

    def counter(metric: catalog.Metric) -> CounterMetricFamily:
        return CounterMetricFamily(metric.name, metric.help, labels=metric.labels)

    clock, energy, pcie = gauge(catalog.GPU_CLOCK), counter(catalog.GPU_ENERGY), counter(catalog.GPU_PCIE_REPLAYS)
    ecc, rows = counter(catalog.GPU_ECC_UNCORRECTED), gauge(catalog.GPU_REMAPPED_ROWS)
    pending, failure = gauge(catalog.GPU_ROW_REMAP_PENDING), gauge(catalog.GPU_ROW_REMAP_FAILURE)
    throttled, xid = gauge(catalog.GPU_THROTTLED), counter(catalog.GPU_XID_ERRORS)
    for gpu, uuid, h in samples:
        for name, hz in h.clocks_hz.items():
            clock.add_metric([gpu, uuid, name], hz)
        if h.energy_joules is not None:
            energy.add_metric([gpu, uuid], h.energy_joules)
        if h.pcie_replays is not None:
            pcie.add_metric([gpu, uuid], h.pcie_replays)
        for scope, n in h.ecc_uncorrected.items():
            ecc.add_metric([gpu, uuid, scope], n)
        for cause, n in h.remapped_rows.items():
            rows.add_metric([gpu, uuid, cause], n)
        if h.remap_pending is not None:
            pending.add_metric([gpu, uuid], h.remap_pending)
        if h.remap_failure is not None:
            failure.add_metric([gpu, uuid], h.remap_failure)
        for why, on in h.throttled.items():
            throttled.add_metric([gpu, uuid, why], on)
    for (gpu, uuid, code), n in sorted(xids.items()):
        xid.add_metric([gpu, uuid, code], n)
    for fam in (clock, energy, pcie, ecc, rows, pending, failure, throttled, xid):
        if fam.samples:
            yield fam


def describe() -> Iterator[Metric]:
    """The families this module may yield, for the registry's name checks."""
    for m in catalog.GPU_HEALTH:
        cls = CounterMetricFamily if m.type == catalog.COUNTER else GaugeMetricFamily
        yield cls(m.name, m.help, labels=m.labels)
