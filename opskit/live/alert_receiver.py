"""A webhook receiver for Alertmanager: every notification is appended as one JSON line to a file
and summarised on stdout.

    python -m opskit.live.alert_receiver --listen 127.0.0.1:0 --out alerts.jsonl --ready-file ready.json

The ready file gets `{"url", "pid"}` once the socket listens. Each line of the output file is
Alertmanager's webhook payload (version 4) with `received_at` (Unix seconds) added, so the drill
can tell when each alert reached the receiver. A body that is not a JSON object is answered 400
and counted at GET /stats; nothing is written for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

from opskit.core import readyfile


def summary(payload: dict) -> str:
    """One line per notification: status, then each alert's name and labels."""
    parts = []
    for alert in payload.get("alerts", []):
        labels = dict(alert.get("labels", {}))
        name = labels.pop("alertname", "?")
        shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        parts.append(f"{alert.get('status', '?')} {name}{{{shown}}}")
    return f"[{payload.get('receiver', '?')}] {payload.get('status', '?')}: " + "; ".join(parts)


def make_app(out: Path) -> web.Application:
    """The receiver app, appending to `out`."""
    stats = {"received": 0, "rejected": 0}

    async def notify(request: web.Request) -> web.Response:
        try:
            payload = await request.json()
        except (ValueError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict):
            stats["rejected"] += 1
            return web.json_response({"error": "expected a JSON object"}, status=400)
        payload["received_at"] = time.time()
        with open(out, "a") as f:  # one short write per line; appends are not interleaved
            f.write(json.dumps(payload, sort_keys=True) + "\n")
        stats["received"] += 1
        print(summary(payload), flush=True)
        return web.json_response({"ok": True})

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application()
    app.router.add_get("/stats", get_stats)
    app.router.add_get("/-/ready", get_stats)
    app.router.add_post("/{tail:.*}", notify)
    return app


def read_notifications(path: str | os.PathLike[str]) -> list[dict]:
    """Every notification written so far; a half-written last line is left for the next read."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


class _ReadyFileError(Exception):
    """The --ready-file could not be written."""


async def _serve(host: str, port: int, out: Path, ready: Path | None) -> None:
    runner = web.AppRunner(make_app(out), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    url = f"http://{host}:{bound}"
    if ready is not None:
        try:
            readyfile.write(ready, {"url": url, "pid": os.getpid()})
        except OSError as exc:  # not an address problem: say which file
            await runner.cleanup()
            raise _ReadyFileError(f"cannot write the ready file {ready}: {exc.strerror or exc}") from None
    print(f"receiver listening on {url}, writing {out}", flush=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse flags, serve until SIGTERM/SIGINT."""
    ap = argparse.ArgumentParser(prog="python -m opskit.live.alert_receiver", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    ap.add_argument("--out", required=True, help="file to append notifications to (JSON lines)")
    ap.add_argument("--ready-file", help="write {url, pid} here once listening")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"receiver: --listen: expected HOST:PORT, got {args.listen!r}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(host, int(port), Path(args.out), Path(args.ready_file) if args.ready_file else None))
    except _ReadyFileError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"receiver: cannot listen on {args.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
