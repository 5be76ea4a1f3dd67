"""The running exporter: the /metrics listener, the metering proxy and the probers on one event loop.

One process, one asyncio event loop, one fresh CollectorRegistry (no global registry):

- `opskit_build_info`, `opskit_llm_quota_limit_requests` for targets with a configured quota and
  `opskit_llm_spend_daily_budget` for targets whose prices carry a daily budget;
- the GPU collector (opskit.sidecar.gpu), read from NVML at scrape time;
- the call series (opskit.sidecar.call_metrics), fed by the metering proxy (`--proxy-listen`, opskit.sidecar.proxy)
  and by the active probe (`--probe`, opskit.sidecar.probe), both on the same loop.

/metrics is rendered by opskit.sidecar.fast_exposition (the bytes of prometheus_client's generate_latest in the
text format 0.0.4, ~20x cheaper for the call histograms; OpenMetrics, with the latency buckets' exemplars,
when the scraper asks for it) on one worker thread, so a slow NVML call
never stalls the proxy's streams on the event loop (ctypes releases the GIL while NVML works); one
worker also means scrapes never overlap. `/healthz` answers 200 "ok" from the loop itself.

Both listeners are guarded (opskit.sidecar.http_guard): header and idle timeouts and a connection cap
whose refusals are counted in `opskit_exporter_connections_refused_total{listener}`. On close (SIGTERM)
the proxy drains first and `/metrics` stays up after it until a scrape has seen every call the proxy
counted, for at most `metrics_linger_s`: calls that finish during the drain reach Prometheus. The
command line around this is opskit.sidecar.exporter.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM_CONTENT_TYPE

from opskit import __version__
from opskit.core import catalog, config
from opskit.core.cli_helpers import redact_url
from opskit.sidecar.call_log import CallLog, CallLogOptions
from opskit.sidecar.call_metrics import CallMetrics, make
from opskit.sidecar.fast_exposition import Renderer
from opskit.sidecar.http_guard import GuardedServer, Limits

log = logging.getLogger("opskit.sidecar.exporter")

DEFAULT_MAX_BODY = 10 * 1024 * 1024
METRICS_MAX_CONNECTIONS = 64  # /metrics and /healthz: Prometheus and probes need a handful
PROXY_TARGET_FALLBACK = "default"


@dataclass(frozen=True)
class Options:
    """What the command line asked for, parsed. Addresses are (host, port); port 0 = a free port."""

    listen: tuple[str, int]
    proxy_listen: tuple[str, int] | None = None
    upstream: str | None = None
    proxy_target: str | None = None
    probe: bool = False
    gpu: bool = True
    nvml_lib: str | None = None
    visible_devices: str | None = None
    ready_file: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    drain_s: float = 20.0
    upstream_timeout_s: float = 300.0
    limits: Limits = Limits()
    metrics_linger_s: float = 15.0
    call_log: CallLogOptions | None = None  # --call-log: a JSON line per proxied call (needs the proxy)
    proxy_workers: int = 1               # >1: that many processes serve the proxy port (proxy_workers)
    config_file: str | None = None       # what the config was loaded from, for proxy workers to load it too
    target_url: str | None = None


def local_url(host: str, port: int) -> str:
    """A URL that reaches a listener bound to host:port from this machine."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _same_url(a: str, b: str) -> bool:
    """Equal URLs up to a trailing slash and the case of scheme and host."""
    pa, pb = urlsplit(a.rstrip("/")), urlsplit(b.rstrip("/"))
    return (pa.scheme.lower(), pa.netloc.lower(), pa.path, pa.query) == \
        (pb.scheme.lower(), pb.netloc.lower(), pb.path, pb.query)


def _api_root(base_url: str) -> str:
    """A base URL without its trailing `/v1` (vLLM's `http://host:8000/v1` -> `http://host:8000`)."""
    base = base_url.rstrip("/")
    return base.removesuffix("/v1") if base.endswith("/v1") else base


def proxy_target(cfg: config.Config, upstream: str | None, name: str | None = None) -> tuple[str, str]:
    """(target name, upstream URL) for the proxy.

    `name` (--proxy-target) picks a configured target: its name labels the proxy's series, and it is
    the upstream unless `upstream` says otherwise (ConfigError, exit 2, for a name not configured).
    Without it: no upstream means the first configured target; an upstream takes the name of the
    configured target whose base URL it is, or whose base URL it is once a trailing `/v1` is removed
    (a proxy forwarding to a vLLM server's root, so that clients keep their `/v1` base URL), so proxy
    and probe series of one API share a `target` label; any other upstream is `default`.
    """
    if name is not None:
        known = [t.name for t in cfg.targets]
        if name not in known:
            raise config.ConfigError("--proxy-target", "",
                                     f"one of the configured targets ({', '.join(known) or 'none configured'})")
        return name, upstream or cfg.target(name).base_url
    if upstream is None:
        t = cfg.target()  # ConfigError (exit 2) when there is none
        return t.name, t.base_url
    for same in (lambda t: _same_url(t.base_url, upstream), lambda t: _same_url(_api_root(t.base_url), upstream)):
        for t in cfg.targets:  # an exact match wins over a root match
            if same(t):
                return t.name, upstream
    return PROXY_TARGET_FALLBACK, upstream


def build_registry(cfg: config.Config, gpu_collector=None,
                   extra_models: Mapping[str, tuple[str, ...]] | None = None
                   ) -> tuple[CollectorRegistry, CallMetrics]:
    """A fresh registry with build info, quotas, the GPU collector (if given) and the call series.

    Model labels are capped to each target's configured models (`extra_models` adds targets that are
    not in the config, such as an unconfigured proxy upstream).
    """
    registry = CollectorRegistry()
    make(catalog.BUILD_INFO, registry).labels(__version__).set(1)
    quota = make(catalog.LLM_QUOTA_LIMIT, registry)
    for t in cfg.targets:
        if t.daily_quota_requests:
            quota.labels(t.name).set(t.daily_quota_requests)
    budget = make(catalog.LLM_SPEND_BUDGET, registry)
    for t in cfg.targets:
        if t.prices is not None and t.prices.daily_budget is not None:
            budget.labels(t.name, t.prices.currency).set(t.prices.daily_budget)
    if gpu_collector is not None:
        registry.register(gpu_collector)
    return registry, CallMetrics(registry, *call_tables(cfg, extra_models))


def call_tables(cfg: config.Config, extra_models: Mapping[str, tuple[str, ...]] | None = None) -> tuple[dict, dict]:
    """(models by target, prices by target) for CallMetrics; proxy workers build theirs from these too."""
    models = {t.name: t.models for t in cfg.targets}
    models.update(extra_models or {})
    return models, {t.name: t.prices for t in cfg.targets if t.prices is not None}


class Exporter:
    """The running exporter: metrics listener, optional proxy and probers, on the current loop."""

    def __init__(self, cfg: config.Config, opts: Options) -> None:
        self.cfg, self.opts = cfg, opts
        self.gpu = None
        if opts.gpu:
            from opskit.sidecar.gpu import GpuCollector

            self.gpu = GpuCollector(lib_path=opts.nvml_lib, visible=opts.visible_devices)
        self.proxy_target: tuple[str, str] | None = None
        extra = self._extra = {}
        if opts.proxy_listen is not None:
            self.proxy_target = proxy_target(cfg, opts.upstream, opts.proxy_target)
            if self.proxy_target[0] not in {t.name for t in cfg.targets}:
                # an unconfigured upstream: its models are unknown, so every model label is `other`;
                # never for a configured target, such as the `default` that --target makes
                extra[self.proxy_target[0]] = ()
        if opts.probe:
            cfg.target()  # a probe needs a target: ConfigError (exit 2) before anything starts
        self.registry, self.metrics = build_registry(cfg, self.gpu, extra)
        self._renderer = Renderer(self.registry)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrape")
        self._refused = make(catalog.CONNECTIONS_REFUSED, self.registry)
        for listener in ("metrics", "proxy") if opts.proxy_listen is not None else ("metrics",):
            self._refused.labels(listener)  # a series from the start: rate() sees the first refusal
        self._runner: web.ServerRunner | None = None
        self._routes = {"/metrics": self._metrics, "/healthz": self._healthz, "/": self._index}
        self._scraped_calls = 0           # proxy calls counted when the last scrape began
        self._scraped = asyncio.Event()   # set at each scrape (the linger after the drain waits on it)
        self._proxy = None
        self.call_log = None
        # CallLogError: one line, exit 1. With proxy workers each worker writes its own files; this one
        # checks the directory and key up front and holds the counters the workers' counts merge into.
        if opts.call_log is not None and self.proxy_target is not None:
            self.call_log = CallLog(opts.call_log, redact_url(self.proxy_target[1]), self.registry)
        self._workers = None  # a proxy_workers.WorkerPool with --proxy-workers > 1
        self._probe_tasks: list[asyncio.Task] = []
        self.port = 0
        self.proxy_port: int | None = None

    async def start(self) -> None:
        """Listen for scrapes, start the proxy and the probers. OSError if an address is taken."""
        limits = replace(self.opts.limits, max_connections=METRICS_MAX_CONNECTIONS)
        server = GuardedServer(self._dispatch, limits, log, "metrics", self._refused.labels("metrics").inc)
        self._runner = web.ServerRunner(server, shutdown_timeout=2.0)
        await self._runner.setup()
        host, port = self.opts.listen
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        if self.gpu is not None:  # try NVML now, so its state is in the log at start, not at first scrape
            await asyncio.get_running_loop().run_in_executor(self._pool, lambda: list(self.gpu.collect()))
        if self.proxy_target is not None:
            await self._start_proxy()
        if self.opts.probe:
            self._start_probers()

    async def _start_proxy(self) -> None:
        from opskit.sidecar.proxy import start_proxy  # aiohttp client and SSE metering only when proxying

        name, upstream = self.proxy_target
        host, port = self.opts.proxy_listen
        if self.opts.proxy_workers > 1:
            await self._start_workers(name, upstream, host, port)
            return
        if self.call_log is not None:
            self.call_log.start()
        self._proxy = await start_proxy(host, port, upstream, name, self.metrics,
                                        max_body_bytes=self.opts.max_body_bytes,
                                        timeout_s=self.opts.upstream_timeout_s, limits=self.opts.limits,
                                        on_refused=self._refused.labels("proxy").inc, call_log=self.call_log)
        self.proxy_port = self._proxy.port

    async def _start_workers(self, name: str, upstream: str, host: str, port: int) -> None:
        from prometheus_client.metrics import MetricWrapperBase

        from opskit.sidecar.proxy_workers import WorkerPool

        o = self.opts
        orders = {"host": host, "upstream": upstream, "target": name, "config_file": o.config_file,
                  "target_url": o.target_url, "extra_models": {k: list(v) for k, v in self._extra.items()},
                  "max_body_bytes": o.max_body_bytes, "timeout_s": o.upstream_timeout_s, "drain_s": o.drain_s,
                  "limits": asdict(o.limits), "call_log": None}
        counters = ()
        if self.call_log is not None:  # each worker writes its own files (suffix -w<index>), same key
            counters = self.call_log.counters
            orders["call_log"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o.call_log).items()}
        metrics = {m._name: m for m in (*vars(self.metrics).values(), self._refused, *counters)
                   if isinstance(m, MetricWrapperBase)}
        self._proxy = self._workers = WorkerPool(o.proxy_workers, host, port, orders, metrics)
        await self._workers.start()
        self.proxy_port = self._workers.port

    def _start_probers(self) -> None:
        from opskit.sidecar.probe import Prober

        for t in self.cfg.targets:  # the Probers of one registry share its probe gauges
            prober = Prober(t, self.cfg.probe, self.metrics, self.registry)
            self._probe_tasks.append(asyncio.create_task(prober.run_forever(), name=f"probe-{t.name}"))

    async def close(self) -> None:
        """Stop probing, drain the proxy's in-flight calls, then stop serving metrics."""
        for task in self._probe_tasks:
            task.cancel()
        if self._probe_tasks:
            await asyncio.wait(self._probe_tasks, timeout=5)
        if self._proxy is not None:
            await self._proxy.close(self.opts.drain_s)
        if self.call_log is not None:  # every call the drain finished is queued: write them all
            await self.call_log.close()
        if self._proxy is not None:
            await self._linger()
        if self._runner is not None:
            await self._runner.cleanup()
        self._pool.shutdown(wait=True)
        if self._workers is not None:
            self._workers.release()
        if self.gpu is not None:
            self.gpu.close()

    async def _linger(self) -> None:
        """Keep /metrics up until a scrape began after the last proxied call was counted, for at most
        metrics_linger_s: without it, calls that finished during the drain would never be scraped."""
        deadline = asyncio.get_running_loop().time() + self.opts.metrics_linger_s
        if self._runner is None or self.opts.metrics_linger_s <= 0 or self._scraped_calls >= self._proxy.finished_calls:
            return
        log.info("stopping: /metrics stays up until scraped once more (at most %gs)", self.opts.metrics_linger_s)
        while self._scraped_calls < self._proxy.finished_calls:
            self._scraped.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._scraped.wait(), left)
            except TimeoutError:
                return

    def ready_info(self) -> dict:
        """What --ready-file says: where to scrape, where the proxy listens, which process."""
        proxy_url = None
        if self.proxy_port is not None:
            proxy_url = local_url(self.opts.proxy_listen[0], self.proxy_port)
        return {"url": local_url(self.opts.listen[0], self.port), "proxy_url": proxy_url, "pid": os.getpid()}

    def describe(self) -> str:
        """One line saying what is enabled; URLs are redacted, secrets never appear."""
        metrics_url = local_url(self.opts.listen[0], self.port)
        parts = [f"opskit exporter {__version__}: metrics on {metrics_url}/metrics (bound {self.opts.listen[0]})"]
        if self.gpu is None:
            parts.append("gpu off")
        else:
            parts.append(f"gpu on ({self.opts.nvml_lib or 'libnvidia-ml.so.1'})")
        if self.proxy_target is not None:
            name, upstream = self.proxy_target
            workers = f" ({self.opts.proxy_workers} worker processes)" if self._workers is not None else ""
            parts.append(f"proxy {local_url(self.opts.proxy_listen[0], self.proxy_port)}{workers} -> "
                         f"{redact_url(upstream)} as target {name}")
            if self.call_log is not None:
                parts.append(f"call log {self.opts.call_log.directory}"
                             f"{' WITH BODIES' if self.opts.call_log.bodies else ''}")
        else:
            parts.append("proxy off")
        probed = ",".join(t.name for t in self.cfg.targets) if self.opts.probe else "off"
        parts.append(f"probe {probed}")
        return "; ".join(parts)

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """The three routes of the metrics listener (GET or HEAD)."""
        route = self._routes.get(request.path)
        if route is None:
            return web.Response(status=404, text="not found: /metrics, /healthz\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD"})
        return await route(request)

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            # Prometheus asks for OpenMetrics first: that page carries the latency buckets' exemplars
            om = "application/openmetrics-text" in request.headers.get("Accept", "")
            seen, body = await loop.run_in_executor(self._pool, self._render, om)
        except Exception as exc:  # a collector bug: one line in the log, a 500 to Prometheus (up stays 1)
            log.error("rendering /metrics failed: %s: %s", type(exc).__name__, exc)
            return web.Response(status=500, text="metrics rendering failed\n")
        self._scraped_calls = max(self._scraped_calls, seen)
        self._scraped.set()
        return web.Response(body=body, headers={"Content-Type": OM_CONTENT_TYPE if om else CONTENT_TYPE_PLAIN_0_0_4})

    def _render(self, openmetrics: bool) -> tuple[int, bytes]:
        """(proxy calls counted, exposition): every call in that count is in the exposition."""
        if self._workers is not None:  # one read of the workers' segments: the count is what is rendered
            seen = self._workers.merge()
        else:
            seen = self._proxy.finished_calls if self._proxy is not None else 0
        return seen, self._renderer.render(openmetrics)

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        return web.Response(text="ok")

    async def _index(self, request: web.BaseRequest) -> web.Response:
        return web.Response(text="opskit exporter: /metrics, /healthz\n")
