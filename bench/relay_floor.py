"""The floor for a Python proxy: a bare byte relay on uvloop, for bench/proxy_overhead.py to measure.

Each client connection gets its own upstream connection and the bytes are copied both ways as they
come (HTTP/1.1 keep-alive works through it unchanged). No HTTP parsing, no metering, no bounds: what a
proxy written in Python on uvloop costs before it does any work of its own. Not a product part.

Usage: python bench/relay_floor.py UPSTREAM_HOST UPSTREAM_PORT READY_FILE
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.upstream = host, port, None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.pause_reading()  # until the upstream connection is there
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            _, self.upstream = await asyncio.get_running_loop().create_connection(
                lambda: _Upstream(self.transport), self.host, self.port)
        except OSError:
            self.transport.close()
            return
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.upstream.transport.write(data)

    def connection_lost(self, exc) -> None:
        if self.upstream is not None:
            self.upstream.transport.close()


async def _main(host: str, port: int, ready: str) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Client(host, port), "127.0.0.1", 0)
    bound = server.sockets[0].getsockname()[1]
    with open(ready, "w") as f:
        json.dump({"url": f"http://127.0.0.1:{bound}", "pid": os.getpid()}, f)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(_main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
