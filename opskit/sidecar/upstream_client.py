"""A minimal, push-based HTTP/1.1 client for the metering proxy's one upstream.

Why not aiohttp's client: it pulls the body through a StreamReader, so every SSE chunk costs a future,
a task switch and a timer reschedule (~30 us of CPU per chunk here). This client parses the response
in `data_received` (opskit.sidecar.upstream_protocol) and hands each body piece straight to a sink (the proxy writes it to the client and
meters it) in the same call: no task switch per chunk. It does what the proxy needs and no more:

- keep-alive connections in a LIFO pool (idle ones closed after `IDLE_S`), TLS with verification
  for https, one request per connection at a time (no pipelining);
- bodies by Content-Length, chunked transfer coding (extensions and trailers ignored) or until close;
  HEAD, 204 and 304 have none; 1xx interim responses are skipped;
- a request on a reused connection that dies before any response byte (the server closed it while
  idle) is retried once on a fresh connection; nothing else is retried;
- timeouts from one watchdog per pool instead of one timer per read: a connection with an
  outstanding request and no byte for `timeout_s` is aborted (precision: a quarter of `timeout_s`,
  at most 1 s). A connection paused because the client reads slowly is not timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from time import perf_counter
from urllib.parse import urlsplit

from opskit.sidecar.upstream_protocol import Conn, Exchange, UpstreamError, UpstreamTimeout

IDLE_S = 30.0             # idle keep-alive connections older than this are closed


class Pool:
    """Connections to one upstream `scheme://host:port` (any path of `url` is the caller's business)."""

    def __init__(self, url: str, connect_timeout_s: float, timeout_s: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        u = urlsplit(url)
        self.host = u.hostname or ""
        self.port = u.port or (443 if u.scheme == "https" else 80)
        default = (u.scheme == "https" and self.port == 443) or (u.scheme == "http" and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default else f"{host}:{self.port}"
        # https: the system's CAs and hostname checks unless the caller trusts a private CA
        self.ssl = (ssl_context or ssl.create_default_context()) if u.scheme == "https" else None
        self.connect_timeout_s, self.timeout_s = connect_timeout_s, timeout_s
        self.idle: list[Conn] = []
        self.busy: set[Conn] = set()
        self._watchdog: asyncio.Task | None = None

    def request_bytes(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        """The request as it goes on the wire (Host and Content-Length set here; headers as the client sent)."""
        length = f"Content-Length: {len(body)}\r\n" if body or method in ("POST", "PUT", "PATCH") else ""
        return b"".join((f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n".encode("utf-8", "surrogateescape"),
                         *[b"%b: %b\r\n" % kv for kv in headers], f"{length}\r\n".encode(), body))

    async def send(self, method: str, request: bytes, watch: Callable[[Exchange], None] | None = None) -> Exchange:
        """Send a request; returns its Exchange once the response head is in. Raises UpstreamError, or
        ClientGone when the caller ends the exchange (`watch` is given each Exchange as it is sent)."""
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        conn = self._idle_conn()
        fresh = conn is None
        while True:  # (one coroutine for both tries: a frame and a coroutine object less per call)
            if conn is None:
                conn = await self._connect()
            ex = conn.send(method, request)
            if watch is not None:
                watch(ex)
            self.busy.add(conn)
            try:
                await ex.head
                return ex
            except asyncio.CancelledError:
                ex.abort()
                raise
            except UpstreamError:
                if fresh or conn.got_bytes or conn.timed_out:
                    raise
                # the server closed the idle connection as we reused it: once more on a fresh one
                conn, fresh = None, True

    def _idle_conn(self) -> Conn | None:
        now = perf_counter()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and not conn.transport.is_closing() and now - conn.last < IDLE_S:
                return conn
            conn.transport.close()
        return None

    async def _connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port, ssl=self.ssl,
                                                       server_hostname=self.host if self.ssl else None)
        except TimeoutError:
            raise UpstreamTimeout("connect timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"connect failed: {type(exc).__name__}") from None
        return conn

    def release(self, conn: Conn) -> None:
        self.busy.discard(conn)
        conn.last = perf_counter()
        self.idle.append(conn)

    def forget(self, conn: Conn) -> None:
        self.busy.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    async def _watch(self) -> None:
        period = min(1.0, max(0.05, self.timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            now = perf_counter()
            for conn in list(self.busy):
                if conn.ex is not None and not conn.paused and not conn.held and now - conn.last > self.timeout_s:
                    conn.timed_out = True
                    conn.abort()
            while self.idle and now - self.idle[0].last > IDLE_S:
                self.idle.pop(0).transport.close()

    async def close(self) -> None:
        """Stop the watchdog and close every connection."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for conn in self.idle + list(self.busy):
            if conn.transport is not None:
                conn.transport.abort()
        self.idle.clear()
        self.busy.clear()
