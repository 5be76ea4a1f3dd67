"""One keep-alive HTTP/1.1 connection to the proxy's upstream: request out, response parsed push-style.

`Conn` is the asyncio Protocol: it parses the response head (opskit.sidecar.upstream_head), then the
body (Content-Length, chunked or until close) inside `data_received` and hands each body piece straight
to the `Exchange`'s sink (the proxy writes it to its client and meters it) in the same call: no task
switch per chunk. The pool that owns these connections (connect, reuse, retry, timeouts) is
opskit.sidecar.upstream_client.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

from opskit.sidecar.upstream_head import parse_head

MAX_HEAD = 64 * 1024      # a response head bigger than this is a protocol error
HIGH_WATER = 256 * 1024   # client write buffer above this pauses reading from the upstream...
LOW_WATER = 64 * 1024     # ...until it is below this again

_HEX = re.compile(b"[0-9A-Fa-f]{1,15}")
_SIZES: dict[bytes, int] = {}   # chunk size lines already checked against _HEX (bounded)

if TYPE_CHECKING:
    from opskit.sidecar.upstream_client import Pool

Sink = Callable[[bytes, float], None]
Whole = Callable[[bytes, int, float], None]


class UpstreamError(Exception):
    """The upstream could not be reached or broke the response (502, or stream_broken)."""


class BadResponse(UpstreamError):
    """The upstream answered with a head that cannot be relayed (bare LF, control characters, a status
    outside 100-599, an oversized head): the client gets 502, and the call is counted as that 502."""


class UpstreamTimeout(UpstreamError):
    """No byte from the upstream for timeout_s (504, or timeout)."""


class ClientGone(Exception):
    """The proxy's client went away while the body was being relayed."""


class Exchange:
    """One request/response on a connection: the head future, then body pieces to the sink."""

    __slots__ = ("head", "done", "pending", "sink", "whole", "status", "reason", "low", "lines", "length", "complete",
                 "conn")

    def __init__(self, conn: Conn) -> None:
        loop = conn.loop  # not asyncio.get_running_loop(): on Python 3.11 that is a getpid() syscall each time
        self.head: asyncio.Future = loop.create_future()
        self.done: asyncio.Future = loop.create_future()
        self.pending: list[tuple[bytes, float]] = []   # body that arrived before a sink was attached
        self.sink: Sink | None = None
        self.whole: Whole | None = None  # see attach()
        self.status, self.reason, self.complete = 0, "", False  # status: 0 until the head is in
        self.low: dict[str, str] = {}  # the first value of each field the proxy reads (upstream_head.READ)
        self.lines: list[str] = []     # the end-to-end header lines as they came (not NOT_RELAYED ones)
        self.length: int | None = None  # the head's Content-Length, unless chunked (a HEAD's too: no body follows)
        self.conn = conn

    def attach(self, sink: Sink, whole: Whole | None = None) -> None:
        """Deliver body pieces to `sink(data, now)` from now on, starting with those already received.
        With `whole`, a read that is exactly one chunk of a chunked body goes to `whole(framed, start,
        now)` instead: the chunk as it came, its data `framed[start:-2]` (a proxy relaying to a chunked
        client writes it as it is)."""
        pending, self.pending = self.pending, []
        self.sink, self.whole = sink, whole
        conn = self.conn
        try:
            for data, now in pending:
                sink(data, now)
        except ClientGone as exc:
            if conn.ex is self:
                conn.ex = None
                conn.abort()
            if not self.done.done():
                self.done.set_exception(exc)
            return  # a finished exchange: finishing the response to the gone client will say so
        if conn.held and not conn.closed and conn.ex is self:
            conn.held = False
            conn.transport.resume_reading()

    def abort(self) -> None:
        """Give up on this exchange: nobody waits for it, and its connection, if it is still busy with
        it, is closed (a finished exchange's connection may already serve another request)."""
        for fut in (self.head, self.done):
            if not fut.done():
                fut.cancel()
        if self.conn.ex is self:
            self.conn.abort()

    def pause(self, client: asyncio.WriteTransport) -> None:
        """The client reads slower than the upstream writes: stop reading until it catches up."""
        self.conn.pause(client)

    def client_gone(self) -> None:
        """The proxy's client hung up (noticed by its connection, not by a write): whoever waits for the
        head or the body gets ClientGone now, and the upstream connection, if still on this exchange,
        is closed instead of waiting out the upstream timeout."""
        if not self.head.done():
            self.head.set_exception(ClientGone())
            self.done.cancel()  # nobody will wait for the body
        elif not self.done.done():
            self.done.set_exception(ClientGone())
        if self.conn.ex is self:
            self.conn.ex = None
            self.conn.abort()


_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)  # body modes
_SIZE, _DATA, _CRLF, _TRAILER = range(4)    # chunked decoder states


class Conn(asyncio.Protocol):
    """One keep-alive connection to the upstream."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ex: Exchange | None = None
        self.buf, self.method = b"", "GET"
        self.mode, self.remaining, self.cstate = _NONE, 0, _SIZE  # body mode, bytes left, chunked decoder state
        self.keep_alive, self.got_bytes, self.last = True, False, perf_counter()
        self.paused = self.held = self.timed_out = self.closed = False

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        ex = self.ex
        if ex is None:
            return
        self.ex = None
        if not ex.head.done():
            ex.head.set_exception(self._error("connection closed before the response head"))
        elif self.mode == _CLOSE and exc is None and not self.timed_out:
            self._complete(ex)
        elif not ex.done.done():
            ex.done.set_exception(self._error("connection closed mid-body"))

    def data_received(self, data: bytes) -> None:
        now = self.last = perf_counter()
        self.got_bytes = True
        ex = self.ex
        if ex is None:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        if not ex.status:
            data = self._head(ex, data)
            if data is None:
                return
        if not data:
            return
        if self.mode != _CHUNKED:
            self._body(ex, data, now)
        elif self.cstate == _SIZE and not self.buf:  # the usual read of a stream: one whole chunk (an event)
            end = data.find(b"\r\n", 0, 18)
            line = data[:end] if end > 0 else b""
            size = _SIZES.get(line)  # (the few sizes a stream's events have, checked once)
            if size is None and end > 0 and _HEX.fullmatch(line):
                size = int(line, 16)
                if len(_SIZES) < 4096:
                    _SIZES[line] = size
            if not size or len(data) != end + size + 4 or not data.endswith(b"\r\n"):
                self._chunked(ex, data, now)
                return
            whole = ex.whole
            if whole is None:
                self._emit(ex, data[end + 2:-2], now)
                return
            try:
                whole(data, end + 2, now)
            except ClientGone as exc:
                self._gone(ex, exc)
        else:
            self._chunked(ex, data, now)

    # ------------------------------------------------------------------ request
    def send(self, method: str, request: bytes) -> Exchange:
        self.ex = ex = Exchange(self)
        self.method, self.buf, self.got_bytes, self.last = method, b"", False, perf_counter()
        self.transport.write(request)
        return ex

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def pause(self, client: asyncio.WriteTransport) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
            self.loop.create_task(self._resume_when_drained(client))

    async def _resume_when_drained(self, client: asyncio.WriteTransport) -> None:
        # Polling, on the rare slow-client path only, keeps this off aiohttp's private drain API.
        while client.get_write_buffer_size() > LOW_WATER and not client.is_closing() and not self.closed:
            await asyncio.sleep(0.005)
        self.paused = False
        self.last = perf_counter()
        if not self.closed:
            self.transport.resume_reading()

    def _error(self, what: str) -> UpstreamError:
        return UpstreamTimeout("upstream timed out") if self.timed_out else UpstreamError(what)

    # ------------------------------------------------------------------ response head
    def _head(self, ex: Exchange, data: bytes) -> bytes | None:
        """Parse the head; the bytes after it, or None while it is incomplete or was refused."""
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    return self._refuse(ex, "response head too large")
                self.buf = buf
                return None
            try:
                status, reason, version, low, lines, framing = parse_head(buf[:end])
            except ValueError as exc:
                return self._refuse(ex, f"bad response head: {exc}")
            buf = buf[end + 4:]
            if 100 <= status < 200 and status != 101:
                continue  # interim response (100 Continue, 103 Early Hints): the real one follows
            break
        self.buf = b""
        ex.length = self._framing(status, framing, version)
        ex.status, ex.reason, ex.low, ex.lines = status, reason, low, lines
        ex.head.set_result(None)  # not `ex`: a future holding the exchange that holds it is a cycle for the GC
        if self.mode == _NONE or (self.mode == _LENGTH and self.remaining == 0):
            self._complete(ex)
        return buf

    def _refuse(self, ex: Exchange, what: str) -> None:
        ex.head.set_exception(BadResponse(what))
        self.ex = None
        self.abort()
        return None

    def _framing(self, status: int, framing: dict[str, str], version: str) -> int | None:
        """Set how the body ends; the Content-Length the head states (None: none, or chunked)."""
        te, cl = framing.get("transfer-encoding", "").lower(), framing.get("content-length", "")
        conn = framing.get("connection", "").lower()
        self.keep_alive = "close" not in conn and (version == "HTTP/1.1" or "keep-alive" in conn)
        length = int(cl) if cl.isdigit() and "chunked" not in te else None
        if self.method == "HEAD" or status in (204, 304):
            self.mode = _NONE
        elif "chunked" in te:
            self.mode, self.cstate = _CHUNKED, _SIZE
        elif length is not None:
            self.mode, self.remaining = _LENGTH, length
        else:
            self.mode, self.keep_alive = _CLOSE, False
        return length

    # ------------------------------------------------------------------ response body
    def _body(self, ex: Exchange, data: bytes, now: float) -> None:
        """A body framed by its length or by the end of the connection (chunked: data_received, _chunked)."""
        mode = self.mode
        if mode == _LENGTH:
            take = data if len(data) <= self.remaining else data[:self.remaining]
            self.remaining -= len(take)
            self._emit(ex, take, now)
            if self.remaining == 0:
                if len(take) < len(data):
                    self.keep_alive = False  # bytes beyond the body: do not trust this connection
                self._complete(ex)
        elif mode == _CLOSE:
            self._emit(ex, data, now)
        else:
            self.keep_alive = False

    def _emit(self, ex: Exchange, data: bytes, now: float) -> None:
        if not data:
            return
        sink = ex.sink
        if sink is None:
            ex.pending.append((data, now))
            if not self.held and sum(len(d) for d, _ in ex.pending) > HIGH_WATER:
                self.held = True  # nobody is taking the body yet: stop reading until attach()
                self.transport.pause_reading()
            return
        try:
            sink(data, now)
        except ClientGone as exc:
            self._gone(ex, exc)

    def _gone(self, ex: Exchange, exc: ClientGone) -> None:
        self.ex = None
        self.abort()
        if not ex.done.done():
            ex.done.set_exception(exc)

    def _chunked(self, ex: Exchange, data: bytes, now: float) -> None:
        """Decode the chunked transfer coding; the data of one read goes to the sink in one piece. (A read
        that is exactly one whole chunk, a stream's usual one, is taken in data_received.)"""
        out: list[bytes] = []
        if self.buf:
            data, self.buf = self.buf + data, b""
        pos, n = 0, len(data)
        try:
            while pos < n:
                state = self.cstate
                if state == _DATA:
                    take = min(self.remaining, n - pos)
                    out.append(data[pos:pos + take])
                    pos += take
                    self.remaining -= take
                    if self.remaining == 0:
                        self.cstate = _CRLF
                    continue
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if n - pos > 4096:
                        raise ValueError("chunk size line too long")
                    self.buf = data[pos:]
                    break
                line = data[pos:end]
                pos = end + 2
                if state == _SIZE:
                    digits = line.split(b";", 1)[0].rstrip(b" \t")
                    if not _HEX.fullmatch(digits):
                        raise ValueError("bad chunk size")
                    size = int(digits, 16)
                    self.remaining, self.cstate = size, (_DATA if size else _TRAILER)
                elif state == _CRLF:
                    if line:
                        raise ValueError("chunk data longer than its size")
                    self.cstate = _SIZE
                elif not line:  # _TRAILER: an empty line ends the body
                    if pos < n:
                        self.keep_alive = False
                    self._emit(ex, b"".join(out), now)
                    self._complete(ex)
                    return
        except ValueError:
            self._emit(ex, b"".join(out), now)
            self.ex = None
            self.abort()
            if not ex.done.done():
                ex.done.set_exception(UpstreamError("bad chunked encoding"))
            return
        self._emit(ex, out[0] if len(out) == 1 else b"".join(out), now)

    def _complete(self, ex: Exchange) -> None:
        ex.complete = True
        self.ex = None
        if not ex.done.done():
            ex.done.set_result(None)
        if self.keep_alive and not self.closed:
            self.pool.release(self)
        elif not self.closed:
            self.transport.close()
