"""`opskit exporter`: the sidecar that serves /metrics for Prometheus.

One process, one asyncio event loop, one fresh CollectorRegistry (no global registry):

- `opskit_build_info`, and `opskit_llm_quota_limit_requests` for targets with a configured quota;
- the GPU collector (opskit.sidecar.gpu), read from NVML at scrape time;
- the call series (opskit.sidecar.call_metrics), fed by the metering proxy (`--proxy-listen`, opskit.sidecar.proxy)
  and by the active probe (`--probe`, opskit.sidecar.probe), both on the same loop.

/metrics is rendered by opskit.sidecar.fast_exposition (the bytes of prometheus_client's generate_latest in the
text format 0.0.4, ~20x cheaper for the call histograms) on one worker thread, so a slow NVML call
never stalls the proxy's streams on the event loop (ctypes releases the GIL while NVML works); one
worker also means scrapes never overlap. `/healthz` answers 200 "ok" from the loop itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import click
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from opskit import __version__
from opskit.core import catalog, config, readyfile
from opskit.core.cli_helpers import FiniteRange, parse_hostport, redact_url
from opskit.sidecar.call_metrics import CallMetrics, make
from opskit.sidecar.fast_exposition import Renderer

log = logging.getLogger("opskit.sidecar.exporter")

DEFAULT_LISTEN = "0.0.0.0:9464"
DEFAULT_MAX_BODY = 10 * 1024 * 1024
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
    if gpu_collector is not None:
        registry.register(gpu_collector)
    models = {t.name: t.models for t in cfg.targets}
    models.update(extra_models or {})
    return registry, CallMetrics(registry, models)


def metrics_table() -> str:
    """The README's metric list, as a Markdown table generated from the catalogue (a test keeps them equal)."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in catalog.ALL:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        rows.append(f"| `{m.name}` | {m.type} | {labels} | {m.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


class Exporter:
    """The running exporter: metrics listener, optional proxy and probers, on the current loop."""

    def __init__(self, cfg: config.Config, opts: Options) -> None:
        self.cfg, self.opts = cfg, opts
        self.gpu = None
        if opts.gpu:
            from opskit.sidecar.gpu import GpuCollector

            self.gpu = GpuCollector(lib_path=opts.nvml_lib, visible=opts.visible_devices)
        self.proxy_target: tuple[str, str] | None = None
        extra = {}
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
        self._runner: web.AppRunner | None = None
        self._proxy = None
        self._probe_tasks: list[asyncio.Task] = []
        self.port = 0
        self.proxy_port: int | None = None

    async def start(self) -> None:
        """Listen for scrapes, start the proxy and the probers. OSError if an address is taken."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/", self._index)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
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
        self._proxy = await start_proxy(host, port, upstream, name, self.metrics,
                                        max_body_bytes=self.opts.max_body_bytes,
                                        timeout_s=self.opts.upstream_timeout_s)
        self.proxy_port = self._proxy.port

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
        if self._runner is not None:
            await self._runner.cleanup()
        self._pool.shutdown(wait=True)
        if self.gpu is not None:
            self.gpu.close()

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
            parts.append(f"proxy {local_url(self.opts.proxy_listen[0], self.proxy_port)} -> "
                         f"{redact_url(upstream)} as target {name}")
        else:
            parts.append("proxy off")
        probed = ",".join(t.name for t in self.cfg.targets) if self.opts.probe else "off"
        parts.append(f"probe {probed}")
        return "; ".join(parts)

    async def _metrics(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(self._pool, self._renderer.render)
        except Exception as exc:  # a collector bug: one line in the log, a 500 to Prometheus (up stays 1)
            log.error("rendering /metrics failed: %s: %s", type(exc).__name__, exc)
            return web.Response(status=500, text="metrics rendering failed\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="opskit exporter: /metrics, /healthz\n")


class ReadyFileError(Exception):
    """The --ready-file could not be written (one line for the user)."""


async def serve(cfg: config.Config, opts: Options) -> None:
    """Run the exporter until SIGTERM or SIGINT, then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before starting: a SIGTERM during start-up is clean too
        loop.add_signal_handler(sig, stop.set)
    exporter = Exporter(cfg, opts)
    try:
        await exporter.start()
    except BaseException:
        await exporter.close()
        raise
    gc.freeze()  # long-lived server: keep start-up objects out of the collector's scans (DESIGN.md)
    log.info("%s", exporter.describe())
    if opts.ready_file is not None:
        try:
            readyfile.write(opts.ready_file, exporter.ready_info())
        except OSError as exc:  # not an address problem: say which file, and stop what started
            await exporter.close()
            raise ReadyFileError(f"cannot write the ready file {opts.ready_file}: {exc.strerror or exc}") from None
    await stop.wait()
    if exporter.proxy_port is not None:
        log.info("stopping: draining the proxy for up to %gs", opts.drain_s)
    else:
        log.info("stopping")
    await exporter.close()
    log.info("stopped")


def _run(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _hostport(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_hostport(value, "--" + param.name.replace("_", "-"))
    except ValueError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[1]) from None


@click.command("exporter")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, callback=_hostport,
              help="HOST:PORT for /metrics and /healthz (port 0: a free port).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config (targets, probe).")
@click.option("--target", "target_url", help="Target API base URL (instead of a config file).")
@click.option("--proxy-listen", callback=_hostport, help="HOST:PORT for the metering proxy.")
@click.option("--upstream", help="URL the proxy forwards to (default: the --proxy-target's or first "
              "configured target's base_url).")
@click.option("--proxy-target", "proxy_target_name", metavar="NAME",
              help="Configured target whose name labels the proxy's series (default: the one whose base_url, "
                   "with or without a trailing /v1, is --upstream; else `default`).")
@click.option("--probe", is_flag=True, help="Send canary calls to every configured target.")
@click.option("--gpu/--no-gpu", default=True, show_default=True, help="Export NVML GPU series.")
@click.option("--nvml-lib", type=click.Path(exists=True, dir_okay=False),
              help="NVML library to load (default: libnvidia-ml.so.1 from the loader path).")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write {url, proxy_url, pid} as JSON here once serving.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_BODY, show_default=True,
              help="Largest request body the proxy accepts (413 beyond).")
@click.option("--drain-s", type=FiniteRange(min=0), default=20.0, show_default=True,
              help="On SIGTERM, how long in-flight proxied calls may take to finish.")
@click.option("--upstream-timeout-s", type=FiniteRange(min=0, min_open=True), default=300.0, show_default=True,
              help="A proxied call whose upstream sends nothing for this long ends 504/timeout.")
def exporter_command(listen, config_file, target_url, proxy_listen, upstream, proxy_target_name, probe, gpu,
                     nvml_lib, ready_file, max_body_bytes, drain_s, upstream_timeout_s) -> None:
    """Serve Prometheus metrics: GPUs (NVML), a metering proxy for real calls, canary probes.

    \b
    Examples:
      opskit exporter --listen :9464                                   # GPU series only
      opskit exporter --listen :9464 --proxy-listen :8080 --upstream http://vllm:8000
      opskit exporter --listen :9464 --config opskit.yaml --proxy-listen :8080 \\
          --upstream http://127.0.0.1:8000 --proxy-target llm-server --probe   # clients use :8080/v1
      opskit exporter --listen :9464 --config opskit.yaml --probe --no-gpu
    """
    for flag, value in (("--upstream", upstream), ("--proxy-target", proxy_target_name)):
        if value is not None and proxy_listen is None:
            raise click.UsageError(f"{flag} needs --proxy-listen")
    if upstream is not None and (problem := config.url_problem(upstream)):  # a bad port or [v6 too: exit 2
        raise config.ConfigError("--upstream", "", problem)
    cfg = config.load(config_file, target_url)
    if proxy_listen is not None:  # no target to proxy to, or a --proxy-target not configured: exit 2 now
        proxy_target(cfg, upstream, proxy_target_name)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import prometheus_client

    prometheus_client.disable_created_metrics()  # *_created series double the page and nothing reads them
    visible = None
    if gpu:
        from opskit.sidecar.gpu import visible_from_env  # pynvml only when GPUs are wanted

        visible = visible_from_env(os.environ)
    opts = Options(listen=listen, proxy_listen=proxy_listen, upstream=upstream, proxy_target=proxy_target_name,
                   probe=probe, gpu=gpu, nvml_lib=os.path.abspath(nvml_lib) if nvml_lib else None, visible_devices=visible,
                   ready_file=ready_file, max_body_bytes=max_body_bytes, drain_s=drain_s,
                   upstream_timeout_s=upstream_timeout_s)
    try:
        _run(serve(cfg, opts))
    except ReadyFileError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen: {exc.strerror or exc}") from None
    except ImportError as exc:  # a part of the exporter missing from this installation
        raise click.ClickException(f"cannot start: {exc}") from None
