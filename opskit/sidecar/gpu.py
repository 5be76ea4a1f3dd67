"""GPU series read from NVML at scrape time; with gpu_health and gpu_mig, the only modules that import pynvml.

`GpuCollector` is a custom collector (the shape of prometheus_client's process_collector): each
scrape asks NVML for every visible GPU and yields metric families named by the catalogue. Readings
are only taken while Prometheus scrapes; the one background thread waits for XID events
(opskit.sidecar.gpu_health.XidWatcher) and never holds up a scrape.

Failure policy, so that one bad GPU never costs the others their series:
- no NVML library (a machine without a GPU): GPU series absent, `opskit_gpu_up 0`, one log line,
  and a cheap, rate-limited retry of nvmlInit at later scrapes;
- NVML up but a driver-level call fails: `opskit_gpu_up 0` and the reason is counted;
- a GPU that errors as a whole (lost, needs reset): its series are dropped and the reason counted;
- one field that errors: only that series is absent and the reason counted, except
  NOT_SUPPORTED (e.g. power on some boards), which is a capability, not an error, and is not counted.
Reasons are NVML's own error names in snake_case (`gpu_is_lost`, `not_supported`, `unknown`...).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import pynvml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from opskit.core import catalog
from opskit.core.records import GpuSample
from opskit.sidecar import gpu_health, gpu_mig
from opskit.sidecar.gpu_health import Health, XidWatcher

log = logging.getLogger("opskit.sidecar.gpu")

# NVML error code -> short snake_case reason, from pynvml's own constants (a bounded label set).
REASONS: dict[int, str] = {
    code: name.removeprefix("NVML_ERROR_").lower()
    for name, code in vars(pynvml).items()
    if name.startswith("NVML_ERROR_") and isinstance(code, int)
}
# Errors that mean the GPU itself is gone or unusable: drop all of its series.
_DEVICE_ERRORS = frozenset({
    pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED, pynvml.NVML_ERROR_INVALID_ARGUMENT,
    pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
})
# Errors that mean the library session is gone: initialise again at a later scrape.
_SESSION_ERRORS = frozenset({
    pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
})
ENV_VARS = ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
DEFAULT_RETRY_S = 30.0

_loaded_path: str | None = None  # the library path pynvml was last pointed at by load_library()
_load_lock = threading.Lock()


def reason(exc: BaseException) -> str:
    """The error-counter reason for an exception raised while talking to NVML."""
    if isinstance(exc, pynvml.NVMLError):
        return REASONS.get(exc.value, "unknown")
    return "unknown"


def load_library(path: str) -> None:
    """Point pynvml at the NVML library at `path` instead of its default `libnvidia-ml.so.1` search.

    pynvml keeps one module-wide library handle and caches function pointers from it, so both are
    replaced together. A path that cannot be loaded raises NVMLError_LibraryNotFound, as pynvml does.
    """
    global _loaded_path
    with _load_lock:
        if _loaded_path == path and pynvml.nvmlLib is not None:
            return
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND) from None
        pynvml.nvmlLib = lib
        pynvml._nvmlGetFunctionPointer_cache.clear()
        _loaded_path = path


def visible_from_env(env: Mapping[str, str]) -> str | None:
    """The device list a container runtime or CUDA gives this process; None when neither is set."""
    for var in ENV_VARS:
        if var in env:
            return env[var]
    return None


def parse_visible(value: str | None) -> frozenset[str] | None:
    """Selectors from a *_VISIBLE_DEVICES value: None = every GPU, empty = none.

    Entries are NVML indexes ("0") or GPU UUIDs ("GPU-8932f937-..."; a unique prefix also matches,
    as CUDA allows), or MIG devices ("0:1", "MIG-..."; opskit.sidecar.gpu_mig). `all` selects every GPU; `none`, `void` or an empty value selects none.
    """
    if value is None or value.strip().lower() == "all":
        return None
    if value.strip().lower() in ("", "none", "void"):
        return frozenset()
    return frozenset(p.strip() for p in value.split(",") if p.strip())


def is_visible(selectors: frozenset[str] | None, index: int, uuid: str) -> bool:
    """Whether the GPU with this NVML index and UUID is selected."""
    if selectors is None:
        return True
    return str(index) in selectors or any(s.startswith("GPU-") and uuid.startswith(s) for s in selectors)


@dataclass
class _Device:
    handle: object
    uuid: str
    name: str


class _FieldError(Exception):
    """A field failed in a way that takes the whole GPU down (lost, reset required...)."""


def _field(errors: dict[str, float], read: Callable[[], float]) -> float | None:
    """One NVML reading, or None when it is unsupported or failed (failures are counted)."""
    try:
        return read()
    except pynvml.NVMLError as exc:
        if exc.value in _DEVICE_ERRORS:
            raise _FieldError() from exc
        if exc.value != pynvml.NVML_ERROR_NOT_SUPPORTED:
            why = reason(exc)
            errors[why] = errors.get(why, 0) + 1
        return None


def read_sample(handle: object, index: int, uuid: str, name: str, errors: dict[str, float]) -> GpuSample:
    """Read one GPU's fields. Raises NVMLError when the GPU as a whole is gone."""
    try:
        util = _field(errors, lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        mem = _field(errors, lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
        temp = _field(errors, lambda: float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)))
        power = _field(errors, lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
    except _FieldError as exc:
        raise exc.__cause__ from None
    return GpuSample(index=str(index), uuid=uuid, name=name, utilization_ratio=util,
                     memory_used_bytes=None if mem is None else float(mem.used),
                     memory_total_bytes=None if mem is None else float(mem.total),
                     temperature_celsius=temp, power_watts=power)


def read_health(handle: object, errors: dict[str, float]) -> Health:
    """One GPU's health readings (opskit.sidecar.gpu_health) under the same failure policy."""
    try:
        return gpu_health.read_health(handle, lambda read: _field(errors, read))
    except _FieldError as exc:
        raise exc.__cause__ from None


class GpuCollector(Collector):
    """Scrape-time NVML collector. Register it in a registry: `registry.register(GpuCollector())`.

    `lib_path` is the NVML library to load (default: pynvml's `libnvidia-ml.so.1` search through the
    dynamic loader); `visible` a *_VISIBLE_DEVICES value (see parse_visible); `retry_s` how often a
    failed nvmlInit is retried; `clock` a monotonic clock (injectable for tests).
    """

    def __init__(self, lib_path: str | None = None, visible: str | None = None,
                 retry_s: float = DEFAULT_RETRY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._lib_path = lib_path
        self._visible, self._selectors = visible, parse_visible(visible)
        self._selection_checked = False         # whether this NVML session's selection was checked
        self._by_uuid = any(s.startswith("GPU-") for s in self._selectors or ())
        self._retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()           # one scrape at a time touches NVML and the state below
        self._initialized = False
        self._next_init = float("-inf")
        self._last_init_error: str | None = None
        self._driver = ""
        self._devices: dict[int, _Device] = {}  # handles, UUIDs and names never change while up
        self._uuids: dict[int, str] = {}        # index -> UUID, kept when a GPU is lost (visibility)
        self._failing: set[int] = set()         # GPUs whose loss was already logged
        self.errors: dict[str, float] = {}      # reason -> count, persists across scrapes
        self._xids = XidWatcher(reason)         # XID events, in its own thread, per NVML session
        self._xid_totals: dict[tuple[str, str, str], float] = {}  # counts of past sessions' watchers
        self._migs = gpu_mig.MigReader(reason, self._count)

    def collect(self) -> Iterator[Metric]:
        """Yield the GPU families for this scrape (called by the registry)."""
        with self._lock:
            try:
                up, read = self._scrape()
            except Exception as exc:  # a collector that raises would fail the whole /metrics page
                log.warning("NVML collection failed: %s: %s", type(exc).__name__, exc)
                self._count("unknown")
                up, read = False, []
            xids, xid_errors = self._xids.counts()
            for key, n in self._xid_totals.items():
                xids[key] = xids.get(key, 0) + n
            errors = dict(self.errors)
            for why, n in xid_errors.items():
                errors[why] = errors.get(why, 0) + n
        samples = [s for s, _ in read]
        yield from _families(samples, self._driver)
        yield from gpu_health.families([(s.index, s.uuid, h) for s, h in read if h is not None], xids)
        g = GaugeMetricFamily(catalog.GPU_UP.name, catalog.GPU_UP.help, value=1.0 if up else 0.0)
        yield g
        c = CounterMetricFamily(catalog.GPU_COLLECT_ERRORS.name, catalog.GPU_COLLECT_ERRORS.help,
                                labels=catalog.GPU_COLLECT_ERRORS.labels)
        for why, n in sorted(errors.items()):
            c.add_metric([why], n)
        yield c

    def describe(self) -> Iterator[Metric]:
        """The families this collector may yield, without touching NVML (for the registry's name checks)."""
        for m in (*(metric for metric, _ in _GAUGES), catalog.GPU_INFO, catalog.GPU_UP):
            yield GaugeMetricFamily(m.name, m.help, labels=m.labels or None)
        yield from gpu_health.describe()
        yield CounterMetricFamily(catalog.GPU_COLLECT_ERRORS.name, catalog.GPU_COLLECT_ERRORS.help,
                                  labels=catalog.GPU_COLLECT_ERRORS.labels)

    def close(self) -> None:
        """Shut the NVML session down (the library stays loaded, as pynvml does)."""
        with self._lock:
            if self._initialized:
                self._initialized = False
                self._stop_xids(join=True)
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlShutdown()

    def _stop_xids(self, join: bool = False) -> None:
        """End this session's XID watcher, keeping its counts (a counter never goes down)."""
        self._xids.stop(join)
        counts, errors = self._xids.counts()
        for key, n in counts.items():
            self._xid_totals[key] = self._xid_totals.get(key, 0) + n
        for why, n in errors.items():
            self._count(why, n)
        self._xids = XidWatcher(reason)

    def _count(self, why: str, n: float = 1) -> None:
        self.errors[why] = self.errors.get(why, 0) + n

    def _scrape(self) -> tuple[bool, list[tuple[GpuSample, Health | None]]]:
        if not self._initialized and not self._init():
            return False, []
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            self._count(reason(exc))
            if exc.value in _SESSION_ERRORS:
                self._lost_session(reason(exc))
            return False, []
        samples = []
        for index in range(count):
            samples += self._read(index)
        if not self._selection_checked:
            self._check_selection(count, samples)
        return True, samples

    def _check_selection(self, count: int, samples: list) -> None:
        """Once per NVML session: a device list that names no GPU NVML sees (a typo, a stale UUID) would
        otherwise leave `opskit_gpu_up 1` and no GPU series without a word."""
        self._selection_checked = True
        if self._selectors and count and not samples and not self._failing:
            log.warning("no GPU series: the visible-devices list %r (%s) matches none of the %d GPU(s) NVML "
                        "sees", self._visible, " or ".join(ENV_VARS), count)

    def _init(self) -> bool:
        """Try nvmlInit, at most once per retry period. True when NVML is up."""
        now = self._clock()
        if now < self._next_init:
            return False
        self._next_init = now + self._retry_s
        try:
            if self._lib_path is not None:
                load_library(self._lib_path)
            pynvml.nvmlInit()
            self._driver = pynvml.nvmlSystemGetDriverVersion()
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            why = reason(exc)
            # A machine with no GPU is not an error to count; anything else (driver not loaded...) is.
            if why != "library_not_found":
                self._count(why)
            if why != self._last_init_error:
                where = f" ({self._lib_path})" if self._lib_path else ""
                log.warning("NVML unavailable%s: %s; GPU series absent, retrying every %gs",
                            where, why, self._retry_s)
                self._last_init_error = why
            return False
        self._initialized, self._last_init_error = True, None
        self._selection_checked = False
        self._devices.clear()
        log.info("NVML up: driver %s, %d GPU(s)", self._driver, count)
        return True

    def _lost_session(self, why: str) -> None:
        log.warning("NVML session lost (%s); re-initialising at a later scrape", why)
        self._initialized, self._last_init_error = False, why
        self._devices.clear()
        self._stop_xids()

    def _device(self, index: int) -> _Device:
        dev = self._devices.get(index)
        if dev is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            dev = _Device(handle, pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle))
            self._devices[index] = dev
            self._uuids[index] = dev.uuid
        return dev

    def _read(self, index: int) -> list[tuple[GpuSample, Health | None]]:
        """One GPU's sample and its MIG devices' (no health: the parent's), or none when it is not
        visible here or failed as a whole. A selected MIG device does not make its parent visible."""
        sel = self._selectors
        migs = gpu_mig.selects_mig(sel, index)
        if sel is not None and str(index) not in sel and not migs:
            # Not ours by index. Without UUID selectors, or with a UUID already known not to match
            # (also once that GPU is lost), don't touch it: its errors are not this pod's.
            uuid = self._uuids.get(index)
            if not self._by_uuid or (uuid is not None and not is_visible(sel, index, uuid)):
                return []
        try:
            dev = self._device(index)
            out: list[tuple[GpuSample, Health | None]] = []
            whole = is_visible(sel, index, dev.uuid)
            if whole:
                out.append((read_sample(dev.handle, index, dev.uuid, dev.name, self.errors),
                            read_health(dev.handle, self.errors)))
                self._xids.register(index, dev.uuid, dev.handle)
            if whole or migs:
                out += [(m, None) for m in self._migs.read(dev.handle, index, dev.uuid, None if whole else sel)]
            if not out:
                return []
        except pynvml.NVMLError as exc:
            self._devices.pop(index, None)  # ask for a fresh handle next time
            self._count(reason(exc))
            if index not in self._failing:
                log.warning("GPU %d dropped from this scrape: %s", index, reason(exc))
                self._failing.add(index)
            return []
        if index in self._failing:
            log.info("GPU %d reporting again", index)
            self._failing.discard(index)
        return out


_GAUGES = (
    (catalog.GPU_UTILIZATION, "utilization_ratio"),
    (catalog.GPU_MEMORY_USED, "memory_used_bytes"),
    (catalog.GPU_MEMORY_TOTAL, "memory_total_bytes"),
    (catalog.GPU_TEMPERATURE, "temperature_celsius"),
    (catalog.GPU_POWER, "power_watts"),
)


def _families(samples: list[GpuSample], driver: str) -> Iterator[Metric]:
    """Metric families for the GPUs that answered; a family with no samples is left out."""
    if not samples:
        return
    for metric, attr in _GAUGES:
        fam = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
        for s in samples:
            value = getattr(s, attr)
            if value is not None:
                fam.add_metric([s.index, s.uuid], value)
        if fam.samples:
            yield fam
    info = GaugeMetricFamily(catalog.GPU_INFO.name, catalog.GPU_INFO.help, labels=catalog.GPU_INFO.labels)
    for s in samples:
        info.add_metric([s.index, s.uuid, s.name, driver, s.parent_uuid], 1.0)
    yield info
