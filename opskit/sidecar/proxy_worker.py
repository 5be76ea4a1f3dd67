"""One proxy worker process of `opskit exporter --proxy-workers N` (started by opskit.sidecar.proxy_workers).

It reads its orders as one JSON line on stdin, loads the same config as the exporter, serves the
metering proxy on the exporter's port (SO_REUSEPORT) and counts its calls into the shared segment it
was handed (opskit.sidecar.shared_counts). On SIGTERM it stops accepting, drains its calls for up to
the exporter's `--drain-s` and exits 0 (SIGINT is left to the exporter, which sends SIGTERM); it also
stops when its stdin reaches EOF, which means the exporter is gone: a worker never outlives it.
Run by the exporter only.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys

from opskit.core import catalog, config
from opskit.sidecar import call_metrics, shared_counts
from opskit.sidecar.http_guard import Limits

log = logging.getLogger("opskit.sidecar.proxy")


async def serve(orders: dict) -> None:
    """Serve the proxy from this process until told to stop."""
    from opskit.sidecar.exporter_server import call_tables
    from opskit.sidecar.proxy import start_proxy

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the whole process group: the exporter stops the workers itself (SIGTERM), and a
    # worker that left on its own before that would look like a crash to restart.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_stdin() -> None:
        try:
            gone = not os.read(0, 4096)
        except OSError:
            gone = True
        if gone:  # the exporter died: stop with it
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, on_stdin)
    cfg = config.load(orders["config_file"], orders["target_url"])
    store = shared_counts.Store(shared_counts.Segment(orders["fd"]))
    extra = {k: tuple(v) for k, v in orders["extra_models"].items()}
    metrics = call_metrics.CallMetrics(store, *call_tables(cfg, extra))
    refused = call_metrics.make(catalog.CONNECTIONS_REFUSED, store).labels("proxy")
    call_log = _call_log(orders, store)
    proxy = await start_proxy(orders["host"], orders["port"], orders["upstream"], orders["target"], metrics,
                              max_body_bytes=orders["max_body_bytes"], timeout_s=orders["timeout_s"],
                              limits=Limits(**orders["limits"]), on_refused=refused.inc, call_log=call_log,
                              reuse_port=True)
    gc.freeze()  # long-lived server: keep start-up objects out of the collector's scans (DESIGN.md)
    gc.set_threshold(200_000, 50, 100)  # as the exporter's (opskit.sidecar.exporter.GC_THRESHOLDS)
    store.serving()
    await stop.wait()
    await proxy.close(orders["drain_s"])
    if call_log is not None:  # every call the drain finished is queued: write them all
        await call_log.close()


def _call_log(orders: dict, store):
    """This worker's call log (its own files, suffix -w<index>; the exporter checked the directory and
    made the key), counting into the shared segment; None without --call-log."""
    if orders.get("call_log") is None:
        return None
    from pathlib import Path

    from opskit.core.cli_helpers import redact_url
    from opskit.sidecar.call_log import CallLog, CallLogOptions

    o = dict(orders["call_log"], suffix=f"-w{orders['index']}")
    o["directory"] = Path(o["directory"])
    o["key_file"] = Path(o["key_file"]) if o["key_file"] else None
    call_log = CallLog(CallLogOptions(**o), redact_url(orders["upstream"]), store)
    call_log.start()
    return call_log


def main() -> None:
    orders = json.loads(sys.stdin.readline())
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {orders['index']}]: %(message)s")
    try:
        import uvloop
    except ImportError:
        uvloop = None
    try:
        (uvloop.run if uvloop is not None else asyncio.run)(serve(orders))
    except OSError as exc:
        log.error("proxy worker %d cannot listen: %s", orders["index"], exc.strerror or exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
