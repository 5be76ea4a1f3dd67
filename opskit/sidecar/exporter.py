"""`opskit exporter`: the sidecar that serves /metrics for Prometheus (the command line).

The flags become `Options`; `serve` runs opskit.sidecar.exporter_server's `Exporter` (the /metrics
listener, the metering proxy and the probers on one event loop) until SIGTERM or SIGINT, then drains
the proxy, keeps /metrics up until it is scraped once more (at most `--metrics-linger-s`) and exits 0.
`metrics_table()` is the README's metric list, generated from the catalogue."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from pathlib import Path

import click

from opskit.core import catalog, config, readyfile
from opskit.core.cli_helpers import FiniteRange, parse_hostport
from opskit.sidecar.call_log import CallLogError
from opskit.sidecar.call_log_cli import call_log_from_flags, call_log_options
from opskit.sidecar.exporter_server import (
    DEFAULT_MAX_BODY,
    METRICS_MAX_CONNECTIONS,
    Exporter,
    Options,
    proxy_target,
)
from opskit.sidecar.http_guard import Limits

log = logging.getLogger("opskit.sidecar.exporter")

DEFAULT_LISTEN = "0.0.0.0:9464"
# Young collections every 200k net allocations, not 700: the proxy's calls free what they allocate by
# reference counting, and a collection every few requests cost ~3 % of its CPU (py-spy; DESIGN.md).
GC_THRESHOLDS = (200_000, 50, 100)


def metrics_table() -> str:
    """The README's metric list, as a Markdown table generated from the catalogue (a test keeps them equal)."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in catalog.ALL:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "-"
        rows.append(f"| `{m.name}` | {m.type} | {labels} | {m.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


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
    gc.set_threshold(*GC_THRESHOLDS)
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


def _workers(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    if value.strip().lower() == "auto":
        from opskit.sidecar.proxy_workers import available_cpus

        return available_cpus()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{value!r}: a whole number >= 1, or auto")
    return n


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
              "configured target's base_url). The proxy stands for it: a client that would call UPSTREAM/X "
              "calls PROXY/X, so with an upstream ending in /v1 OPENAI_BASE_URL is the proxy's root.")
@click.option("--proxy-target", "proxy_target_name", metavar="NAME",
              help="Configured target whose name labels the proxy's series (default: the one whose base_url, "
                   "with or without a trailing /v1, is --upstream; else `default`).")
@click.option("--proxy-workers", callback=_workers, metavar="N|auto",
              help="Processes serving the proxy port (SO_REUSEPORT), one /metrics for all (default 1: the proxy "
                   "runs in the exporter's own process; auto: the CPUs this container may use).")
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
@click.option("--client-header-timeout-s", type=FiniteRange(min=0, min_open=True), default=Limits.header_timeout_s,
              show_default=True, help="A request head must be complete this long after its first byte "
              "(else 408 and the connection is closed); proxy and /metrics.")
@click.option("--client-body-timeout-s", type=FiniteRange(min=0, min_open=True), default=Limits.body_timeout_s,
              show_default=True, help="A proxied request body must be complete this long after its head (else 408).")
@click.option("--client-idle-timeout-s", type=FiniteRange(min=0, min_open=True), default=Limits.idle_timeout_s,
              show_default=True, help="A client connection with no request for this long is closed (keep clients' "
              "own idle timeouts shorter); proxy and /metrics.")
@click.option("--max-connections", type=click.IntRange(min=1), default=Limits.max_connections, show_default=True,
              help=f"Client connections the proxy holds at once; more are answered 503 and counted in "
              f"opskit_exporter_connections_refused_total (/metrics holds {METRICS_MAX_CONNECTIONS}).")
@click.option("--metrics-linger-s", type=FiniteRange(min=0), default=15.0, show_default=True,
              help="On SIGTERM, after the drain, /metrics stays up until scraped once more, for at most this long, "
              "so calls that finished while draining reach Prometheus (use your scrape interval).")
@call_log_options
def exporter_command(listen, config_file, target_url, proxy_listen, upstream, proxy_target_name, proxy_workers, probe, gpu,
                     nvml_lib, ready_file, max_body_bytes, drain_s, upstream_timeout_s, client_header_timeout_s,
                     client_body_timeout_s, client_idle_timeout_s, max_connections, metrics_linger_s,
                     **call_log) -> None:
    """Serve Prometheus metrics: GPUs (NVML), a metering proxy for real calls, canary probes.

    \b
    Examples:
      opskit exporter --listen :9464                                   # GPU series only
      opskit exporter --listen :9464 --proxy-listen :8080 --upstream http://vllm:8000
      opskit exporter --listen :9464 --config opskit.yaml --proxy-listen :8080 \\
          --upstream http://127.0.0.1:8000 --proxy-target llm-server --probe   # :8080/v1 as :8000/v1
      opskit exporter --listen :9464 --config opskit.yaml --probe --no-gpu
      opskit exporter --listen :9464 --proxy-listen :8080 --upstream http://vllm:8000 --call-log /var/log/opskit
    """
    call_log_opts = call_log_from_flags(**call_log)
    for flag, value in (("--upstream", upstream), ("--proxy-target", proxy_target_name),
                        ("--proxy-workers", proxy_workers), ("--call-log", call_log_opts)):
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
                   upstream_timeout_s=upstream_timeout_s, metrics_linger_s=metrics_linger_s,
                   limits=Limits(client_header_timeout_s, client_body_timeout_s, client_idle_timeout_s, max_connections),
                   call_log=call_log_opts, proxy_workers=proxy_workers or 1, target_url=target_url,
                   config_file=os.path.abspath(config_file) if config_file else None)
    try:
        _run(serve(cfg, opts))
    except (ReadyFileError, CallLogError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen: {exc.strerror or exc}") from None
    except ImportError as exc:  # a part of the exporter missing from this installation
        raise click.ClickException(f"cannot start: {exc}") from None
