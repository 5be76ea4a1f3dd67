"""Process plumbing: one (uv)loop, two listeners, the ready file, signals, GC tuning.

GC: after start-up every long-lived object is moved out of the collector's reach (`gc.freeze()`),
and the young-generation threshold is raised to 200,000. The threshold counts *net* allocations of
tracked objects, and a stream's ~80 objects are freed by reference counting when it ends (normal
traffic leaves no cyclic garbage; checked with DEBUG_SAVEALL), so at a steady load the collector
does not run at all; at 50,000 it ran once while ~650 streams ramped up and stalled every stream
for 25-75 ms on this VM (DESIGN.md, performance notes; bench/README.md).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import sys

from aiohttp import web

from opskit.core import readyfile
from opskit.mock.admin import build_admin_app
from opskit.mock.server import build_app
from opskit.mock.state import MockState

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServeError(Exception):
    """Start-up failed (address in use, unwritable ready file): one line for the user."""


def write_ready(path: str, info: dict) -> None:
    """Write the ready file atomically: a reader sees nothing or the whole JSON."""
    try:
        readyfile.write(path, info)
    except OSError as exc:
        raise ServeError(f"cannot write the ready file {path}: {exc.strerror or exc}") from None


async def _start(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                           shutdown_timeout=0.5)
    await runner.setup()
    await web.SockSite(runner, sock, shutdown_timeout=0.5, backlog=4096).start()
    return runner


async def _main(state: MockState, listen: tuple[str, int], admin: tuple[str, int], ready_file: str | None) -> None:
    try:
        api_sock = _bind(*listen, backlog=4096)
        admin_sock = _bind(*admin, backlog=128)
    except OSError as exc:
        raise ServeError(f"cannot listen: {exc.strerror or exc}") from None
    runners = [await _start(build_app(state), api_sock), await _start(build_admin_app(state), admin_sock)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    info = {"url": _url(api_sock), "admin_url": _url(admin_sock), "pid": os.getpid()}
    gc.collect()
    gc.freeze()
    gc.set_threshold(200_000, 50, 100)
    if ready_file:
        write_ready(ready_file, info)
    print(f"opskit mock: serving {info['url']} (admin {info['admin_url']}, auth {state.auth.scheme})",
          file=sys.stderr, flush=True)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


def serve(state: MockState, listen: tuple[str, int], admin: tuple[str, int], ready_file: str | None) -> None:
    """Run until SIGTERM or SIGINT, then return (exit status 0)."""
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_main(state, listen, admin, ready_file))
