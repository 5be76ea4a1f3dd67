"""The metering proxy's client side: HTTP/1.1 connections parsed push-style, bounded like http_guard.

Why not aiohttp's server: per request it builds a request object, a payload stream, a response
object and writer, and wakes a per-connection task through futures (~35 % of the proxy's CPU per
non-streamed call). Here llhttp (through httptools, the C parser aiohttp and Node.js use) calls back
into `Conn` from `data_received`; a complete request starts one task running the proxy's handler, which
writes its response straight to the transport (opskit.sidecar.proxy). What a client may do is bounded
as on the exporter's other listener (opskit.sidecar.http_guard, same `Limits`):

- the parser refuses what could smuggle a second request: Content-Length with Transfer-Encoding, two
  Content-Lengths, bad chunk sizes, obs-fold, bare LF, control characters; a head over MAX_HEAD is
  answered 431; HTTP versions other than 1.0/1.1 are answered 505. Each refusal is a 4xx/5xx with
  `Connection: close`, logged at most once per LOG_EVERY_S (with a count), never with a traceback;
- a connection cap (`max_connections`): one more is answered 503 and closed, `on_refused()` is called;
- a header timeout (first byte of a head -> its end: 408) and an idle timeout (keep-alive connection
  with no request), checked by one watchdog per server instead of a timer per request; the body
  timeout is the handler's (opskit.sidecar.proxy_request's `read_body`);
- pipelined requests are answered in order, one at a time; reading pauses while one waits;
- after an early answer (413, 408, 400) the connection is half-closed and what the client still sends
  is read and dropped for LINGER_S, so it sees the answer rather than a reset;
- `on_lost`: a callback the handler sets while it waits on the upstream (the upstream side of a call
  whose client hung up is dropped at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from time import perf_counter

import httptools

from opskit.sidecar.http_guard import HEAD_TIMEOUT, LINGER_S, REFUSED, Limits, Throttle, plain
from opskit.sidecar.proxy_request import BodyError, ClientLeft, Request, TooLarge

MAX_HEAD = 64 * 1024  # request line and headers; more is answered 431


BAD_REQUEST = plain("400 Bad Request", "malformed request\n")
HEAD_TOO_LARGE = plain("431 Request Header Fields Too Large", "request head too large\n")
BAD_VERSION = plain("505 HTTP Version Not Supported", "only HTTP/1.0 and HTTP/1.1 are served\n")


class _Refuse(Exception):
    """Raised from a parser callback: answer `response`, close, and log `why`."""

    def __init__(self, response: bytes, why: str) -> None:
        super().__init__(why)
        self.response = response


Handler = Callable[[Request], Awaitable[bool]]  # True: the connection may carry another request


class Server:
    """The listening side: connections, the watchdog, the cap and the drain."""

    def __init__(self, handler: Handler, limits: Limits, log: logging.Logger, what: str,
                 on_refused: Callable[[], None] | None = None, max_body: int = 1 << 62) -> None:
        self.handler, self.limits, self.log, self.what, self.on_refused = handler, limits, log, what, on_refused
        self.max_body = max_body  # body bytes kept per request; past it the body is counted and dropped
        self.conns: set[Conn] = set()
        self.draining = False
        self.loop = asyncio.get_running_loop()
        self._throttle = Throttle()
        self._server: asyncio.Server | None = None
        self._watchdog: asyncio.Task | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        self._server = await self.loop.create_server(lambda: Conn(self), host, port, reuse_port=reuse_port or None,
                                                     backlog=1024)
        self._watchdog = self.loop.create_task(self._watch())
        return self._server.sockets[0].getsockname()[1]

    def refused(self, why: str) -> None:
        held = self._throttle.take()
        if held is not None:
            since = f" ({held} more since the last such line)" if held else ""
            self.log.warning("%s: malformed request: %s%s", self.what, " ".join(why.split())[:200], since)

    def failed(self, exc: Exception) -> None:
        held = self._throttle.take()
        if held is not None:
            since = f" ({held} more since the last such line)" if held else ""
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
            # the type and the place only: a message may hold what the peer sent
            self.log.error("%s: handler failed: %s%s%s", self.what, type(exc).__name__, at, since)

    def tasks(self) -> list[asyncio.Task]:
        return [c.task for c in self.conns if c.task is not None]

    async def stop_accepting(self) -> None:
        """Stop listening; idle keep-alive connections are closed, busy ones after their response."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            if conn.current is None:
                conn.close()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for conn in list(self.conns):
            conn.close(abort=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _watch(self) -> None:
        lim = self.limits
        period = min(1.0, max(0.02, min(lim.header_timeout_s, lim.idle_timeout_s) / 4))
        while True:
            await asyncio.sleep(period)
            now = perf_counter()
            for conn in list(self.conns):
                if conn.current is not None or conn.closing:
                    continue
                if conn.head_at and now - conn.head_at > lim.header_timeout_s:
                    conn.answer(HEAD_TIMEOUT)
                elif conn.idle_at and now - conn.idle_at > lim.idle_timeout_s:
                    conn.close()


class Conn(asyncio.Protocol):
    """One client connection (httptools calls the on_* methods from feed_data)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Request | None = None   # the request whose head or body is being parsed
        self.current: Request | None = None   # the request being answered
        self.queue: deque[Request] = deque()  # pipelined requests waiting for their turn
        self.task: asyncio.Task | None = None
        self.on_lost: Callable[[], None] | None = None
        self.head_at = 0.0     # when the head being parsed began (0: none)
        self.head_size = 0     # bytes of the head being parsed, as the parser hands them over
        self.head_raw = 0      # bytes read while that head stayed incomplete
        self.idle_at = perf_counter()
        self.closing = False   # answered for good: read and drop the rest
        self.lingering = False  # half-closed after an answer; closed LINGER_S later
        self.paused = False
        self.after: bytes | None = None
        self.last = False      # a request that closes the connection is complete: read no more  # an answer owed once the current response is done (pipelined garbage)

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport) -> None:
        server = self.server
        if len(server.conns) >= server.limits.max_connections or server.draining:
            transport.write(REFUSED)
            transport.close()
            self.closing = True
            if server.on_refused is not None:
                server.on_refused()
            return
        self.transport = transport
        server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.conns.discard(self)
        self.transport = None
        for req in (self.parsing, self.current):
            if req is not None and not req.complete:
                req._wake(ClientLeft(ClientLeft.message))
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering after an answer: read and drop
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data, exc)
            return
        except httptools.HttpParserCallbackError as exc:
            refuse = exc.__context__
            if isinstance(refuse, _Refuse):
                self._refuse(refuse.response, str(refuse))
                return
            raise
        except httptools.HttpParserError as exc:
            if self.last:  # bytes after a request that ends the connection: dropped, not an error
                self.closing = True
            else:
                self._refuse(BAD_REQUEST, str(exc) or type(exc).__name__)
            return
        if self.head_at:  # the head is still incomplete after this read: all of it was head
            self.head_raw += len(data)
            if self.head_raw > MAX_HEAD:  # (the parser holds a field's bytes until the field ends)
                self._refuse(HEAD_TOO_LARGE, "request head too large")

    def _upgrade(self, data: bytes, exc: httptools.HttpParserUpgrade) -> None:
        """An Upgrade request (ignored: it goes on as a plain one, RFC 9110 7.8) or CONNECT (answered
        405, then closed): the parser stops at it; for an Upgrade a fresh parser takes the rest."""
        req = self.queue[-1] if self.queue else self.current
        if req is None or req.method == "CONNECT" or self.closing:
            self.closing = True
            if req is not None:
                req.keep_alive = False
            return
        self.parser = httptools.HttpRequestParser(self)
        offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
        if offset < len(data):
            self.data_received(data[offset:])

    # ------------------------------------------------------------------ httptools callbacks
    def on_message_begin(self) -> None:
        self.parsing = Request(self, perf_counter())
        self.head_at, self.head_size, self.head_raw, self.idle_at = self.parsing.t0, 0, 0, 0.0

    def on_url(self, url: bytes) -> None:
        req = self.parsing
        self.head_size += len(url)
        req.target = req.target + url.decode("utf-8", "surrogateescape") if req.target else \
            url.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.parsing
        if req.in_body:
            return  # a trailer field of a chunked body: not forwarded (the body goes on with a length)
        self.head_size += len(name) + len(value) + 4
        req.headers.append((name, value))  # forwarded as sent: llhttp admits only tokens in a name, no CR/LF/NUL
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            req.length = int(value)  # llhttp checked it is digits, and that there is only one
        elif n == 6 and name.lower() == b"expect":
            req.expect = value.strip().lower() == b"100-continue"
        elif n == 10 and name.lower() == b"connection":
            req.connection = value
        elif n == 4 and name.lower() == b"host":
            req.hosts += 1

    def on_headers_complete(self) -> None:
        req, parser = self.parsing, self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _Refuse(BAD_VERSION, f"HTTP version {version[:8]}")
        if self.head_size > MAX_HEAD:
            raise _Refuse(HEAD_TOO_LARGE, "request head too large")
        if req.hosts > 1 or (req.hosts == 0 and version == "1.1"):  # RFC 9112 3.2
            raise _Refuse(BAD_REQUEST, "a request needs exactly one Host field")
        req.in_body = True
        req.method = parser.get_method().decode("ascii", "replace")
        req.version, req.keep_alive = version, parser.should_keep_alive()
        self.head_at = 0.0
        if self.current is None:
            self._start(req)
        else:
            self.queue.append(req)
            if not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        req.size += len(body)
        if req.size > self.server.max_body:
            if req.failure is None:
                req._wake(TooLarge(f"request body over {self.server.max_body} bytes"))
            req.parts.clear()
            return
        req.parts.append(body)

    def on_message_complete(self) -> None:
        req, self.parsing = self.parsing, None
        req.complete = True
        req._wake()
        if not req.keep_alive:
            self.last = True  # what follows is dropped (RFC 9112 9.6)

    # ------------------------------------------------------------------ answering
    def _start(self, req: Request) -> None:
        self.current = req
        self.task = self.loop.create_task(self._serve(req))

    async def _serve(self, req: Request) -> None:
        keep = False
        try:
            keep = await self.server.handler(req)
        except Exception as exc:  # a bug, not a peer's doing: one line, and the connection is closed
            self.server.failed(exc)
        finally:
            self.on_lost = None
            self._finished(req, keep)

    def _finished(self, req: Request, keep: bool) -> None:
        self.current, self.task = None, None
        if self.transport is None or self.lingering:
            return
        if self.after is not None:
            self.answer(self.after)
            return
        if not (keep and req.keep_alive and req.complete) or self.server.draining or self.closing:
            self.close()
            return
        if self.queue:
            self._start(self.queue.popleft())
            return
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.head_at:
            self.head_at = perf_counter()  # a pipelined head's time counts from now
        elif self.parsing is None:
            self.idle_at = perf_counter()

    def _refuse(self, response: bytes, why: str) -> None:
        self.server.refused(why)
        current = self.current
        if current is not None and current is self.parsing:  # its own body is malformed: its handler answers
            self.closing = True
            current._wake(BodyError(BodyError.message))
            return
        if current is not None:  # garbage after a pipelined request: answer once that one is done
            self.after, self.closing = response, True
            self.queue.clear()
            return
        self.answer(response)

    def answer(self, response: bytes) -> None:
        """Write a closing answer, half-close, and read and drop what still comes for LINGER_S."""
        self.closing = True
        transport = self.transport
        if transport is None or self.lingering:
            return
        self.lingering = True
        transport.write(response)
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, transport.close)

    def close(self, abort: bool = False) -> None:
        self.closing = True
        if self.transport is not None:
            (self.transport.abort if abort else self.transport.close)()
