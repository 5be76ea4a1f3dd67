"""Metering reverse proxy: forwards every request to ONE upstream and meters the LLM calls.

Clients point their base URL at the proxy instead of the API; the proxy forwards each request
(method, path, query, headers minus hop-by-hop, body) to the configured upstream, rewrites Host to the
upstream's, and passes the response bytes back unchanged and unbuffered: each chunk is written to the
client as it arrives. It is a reverse proxy for one upstream, never an open proxy: CONNECT is answered
405 and absolute-form request targets (`GET http://other/...`) 400; nothing is ever sent elsewhere.

Metered calls: `POST` to a path ending in `/chat/completions` or `/completions`. Each gives exactly one
CallRecord (source "proxy") describing what the CLIENT got; every other path (`/models`, ...) is
forwarded but not metered, because it is not a model call and would skew latency histograms.

- duration: request received by the proxy -> last byte written to the client.
- TTFT: to the arrival of the first SSE event carrying `content` or `reasoning_content`; for a successful
  non-streamed call it equals the duration. Tokens come from the server's `usage` (else text chunks).
- error_type: from the status (`records.error_type_for_status`); upstream unreachable -> the client gets
  502 and the record says 502/connection; a response head that cannot be relayed as sent (bare LF,
  control characters, status outside 100-599) -> 502/server_error; no response headers within
  `timeout_s` -> 504/timeout. After the headers: the upstream cutting the body, an event stream ending
  without `data: [DONE]`, an event that is not JSON or a line over the SSE parser's bound ->
  stream_broken (malformed events are still passed through: the client's SDK fails on them, so the call
  counts as failed); a stream `error` event -> server_error; no byte for `timeout_s` -> timeout; the
  client going away -> client_disconnect, unless a malformed or error event came first (SDKs give up on
  those; the cause is what gets counted). When the upstream breaks a stream the proxy closes the client
  connection too, so the client sees the break it would have seen directly. Whatever status the client
  gets is the one counted, and each call is counted exactly once, whatever its body holds.
- The client's faults are the client's (client_error / client_disconnect, which the SLO alerts leave
  out): a body over `max_body_bytes` -> 413, not in within the body timeout -> 408 (opskit.sidecar.
  proxy_request's `read_body`); a client hanging up, or the drain cutting it, before its body is in ->
  0/client_disconnect, nothing sent upstream. A body that is not JSON is forwarded: the upstream judges it.
- A client that hangs up while the upstream is silent (before the head, or between chunks) is noticed
  by its connection (opskit.sidecar.proxy_http's `on_lost`): the upstream connection is closed at once
  and the call ends client_disconnect, instead of both waiting out `timeout_s`.
- Authorization and every other header pass through untouched; headers are never logged (a call log,
  opskit.sidecar.call_log, gets each finished call off the loop and keeps a keyed hash of Authorization).
  Path and body go byte for byte (a compressed body too): HMAC-signed requests stay valid unless the
  upstream URL has a path prefix (it is prepended to every path, changing what was signed).
- Metered calls get `Accept-Encoding` narrowed to gzip/deflate/identity, so a copy of a compressed body
  can be decoded for metering (bounded: opskit.sidecar.metering); the client gets the upstream's bytes.
- Not proxied: WebSocket upgrades (the request goes on as a plain one). Clients are bounded by
  opskit.sidecar.proxy_http. Speed: both sides are push-parsed; a body piece goes from the upstream's
  `data_received` through `_sink` (write, then meter). Cost: bench/proxy_overhead.py."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from http import HTTPStatus
from time import perf_counter
from urllib.parse import urlsplit

from opskit.core import records
from opskit.sidecar.call_metrics import CallMetrics
from opskit.sidecar.http_guard import Limits, Throttle
from opskit.sidecar.metering import SOURCE, MeteredCall, model_of
from opskit.sidecar.proxy_http import Server
from opskit.sidecar.proxy_request import BodyError, Request
from opskit.sidecar.upstream_client import Pool
from opskit.sidecar.upstream_head import HOP_BY_HOP, NOT_RELAYED
from opskit.sidecar.upstream_protocol import (
    HIGH_WATER,
    BadResponse,
    ClientGone,
    Exchange,
    UpstreamError,
    UpstreamTimeout,
)

log = logging.getLogger("opskit.sidecar.proxy")

METERED_SUFFIXES = ("/chat/completions", "/completions")
# Also dropped from requests: opskit.sidecar.upstream_client writes Host and Content-Length itself, and it sends the
# body at once, so an Expect: 100-continue (the proxy already answered it) must not reach the upstream.
REQUEST_DROP = frozenset(n.encode() for n in HOP_BY_HOP | {"host", "content-length", "expect"})  # (request
# headers stay bytes, as sent)
DECODABLE = {b"gzip", b"x-gzip", b"deflate", b"identity"}
ERROR_TYPE_HEADER = "X-Opskit-Error-Type"


def _dropped(connection, base: frozenset):
    """Hop-by-hop names plus any the Connection header lists (RFC 9110 7.6.1); str or bytes alike."""
    if not connection:
        return base
    return base | {t.strip().lower() for t in connection.split("," if isinstance(connection, str) else b",")}


def _accept_encoding(value: bytes) -> bytes:
    """The codings of an Accept-Encoding value the meter can decode (identity if none)."""
    keep = [t for t in value.split(b",") if t.split(b";")[0].strip().lower() in DECODABLE]
    return b",".join(keep).strip() or b"identity"


def _head(status: int, reason: str, lines: list[str], extra: str) -> bytes:
    """A response head: status line, the header lines as given, then `extra` (framing, Connection)."""
    fields = "\r\n".join(lines) + "\r\n" if lines else ""
    return f"HTTP/1.1 {status} {reason}\r\n{fields}{extra}\r\n".encode("utf-8", "surrogateescape")


_JSON = ["Content-Type: application/json; charset=utf-8"]


def _error(req: Request, status: int, message: str, kind: str, close: bool = False,
           error_type: str | None = None) -> bool:
    """Answer with a small OpenAI-style error body produced by the proxy itself; whether the connection
    may carry another request. On its own 502/504 the header ERROR_TYPE_HEADER names the error type the
    exporter counts (connection, timeout, server_error), so the client sees why without the exporter's log."""
    body = json.dumps({"error": {"message": message, "type": kind, "source": "opskit-proxy"}}).encode()
    keep = not close and req.keep_alive
    extra = (f"{ERROR_TYPE_HEADER}: {error_type}\r\n" if error_type else "") + f"Content-Length: {len(body)}\r\n"
    head = _head(status, HTTPStatus(status).phrase, _JSON, extra + _connection(req, keep))
    if not keep:
        req.conn.answer(head + body)  # half-closed; what the client still sends is read and dropped
        return False
    transport = req.conn.transport
    if transport is not None:
        transport.write(head + body)
    return True


class ProxyServer:
    """A running proxy. `port` is the bound port; `close()` drains and stops it."""

    def __init__(self, proxy: _Proxy, server: Server, port: int) -> None:
        self._proxy, self._server, self.port = proxy, server, port
        self._closed = False

    @property
    def finished_calls(self) -> int:
        """Metered calls counted so far (each once)."""
        return self._proxy.finished

    @property
    def open_calls(self) -> int:
        """Metered calls being handled now: uploading, waiting for the upstream or relaying."""
        return self._proxy.open

    @property
    def open_connections(self) -> int:
        """Client connections open now (what the connection cap counts)."""
        return len(self._server.conns)

    async def close(self, grace_s: float = 10) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_s`, cut the rest, close. Calls
        cut at the deadline are recorded as stream_broken: the client sees its stream break. Twice is harmless."""
        if self._closed:
            return
        self._closed = True
        await self._server.stop_accepting()
        tasks = self._server.tasks()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            self._proxy.closing = True
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self._server.close()
        await self._proxy.pool.close()


class _Proxy:
    """The request handler and its upstream connection pool."""

    def __init__(self, upstream: str, target: str, metrics: CallMetrics, timeout_s: float,
                 connect_timeout_s: float, ssl_context: ssl.SSLContext | None, call_log=None) -> None:
        url = urlsplit(upstream)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream must be an http:// or https:// URL, got scheme {url.scheme!r}")
        self.prefix = url.path.rstrip("/")  # an upstream path prefix is prepended to every request path
        self.target, self.metrics, self.call_log, self.closing = target, metrics, call_log, False
        self.open = 0  # metered calls being handled
        self.finished = 0  # metered calls counted so far (the exporter lingers until a scrape has them all)
        self.pool = Pool(upstream, connect_timeout_s, timeout_s, ssl_context)
        self._throttle = Throttle()

    def _log_failure(self, exc: Exception) -> None:
        """At most one line per LOG_EVERY_S, with a count of the failures since: with the upstream down,
        a line per call would flood the sidecar's log at the traffic's rate (the metrics count each)."""
        held = self._throttle.take()
        if held is not None:
            since = f" ({held} more since the last such line)" if held else ""
            log.warning("upstream of %s failed: %s%s", self.target, exc, since)

    async def handle(self, req: Request) -> bool:
        """Entry point for every request the proxy receives; whether the connection may be kept."""
        if req.method == "CONNECT":
            return _error(req, 405, "CONNECT is not supported: this is a reverse proxy", "method_not_allowed", True)
        if not req.target.startswith("/"):
            return _error(req, 400, "absolute-form request targets are refused: this proxy forwards only to its "
                          "configured upstream", "invalid_request", True)
        if req.method != "POST" or not req.target.partition("?")[0].endswith(METERED_SUFFIXES):
            return await self._forward(req, None)
        call = MeteredCall(req.t0, self.call_log.capture if self.call_log is not None else 0)
        self.open += 1
        try:
            return await self._forward(req, call)
        except asyncio.CancelledError:  # close() cut it wherever it was; a relayed stream says more
            call.fail(records.STREAM_BROKEN if self.closing else records.CLIENT_DISCONNECT)
            raise
        finally:
            self.open -= 1
            rec = call.record(self.target, self.metrics.model_label(self.target, call.model))
            (self.metrics.finished if call.in_flight else self.metrics.observe)(rec)
            if self.call_log is not None:
                self.call_log.submit(rec, call, req.header(b"authorization"))
            self.finished += 1

    async def _forward(self, req: Request, call: MeteredCall | None) -> bool:
        body = req.body_if_in()
        if body is None:
            try:
                body = await req.read_body()
            except BodyError as exc:  # the client's error, counted as one; nothing reached the API
                if call is not None:
                    call.end = perf_counter()
                    if exc.status:  # else: code 0 / client_disconnect, as the call started
                        call.code, call.error_type = exc.status, records.CLIENT_ERROR
                return _error(req, exc.status or 400, str(exc), exc.kind, True)
        conn = req.conn
        if conn.transport is None or conn.transport.is_closing():  # the client left with its upload
            if call is not None:
                call.end = perf_counter()
            return False
        drop, metered = _dropped(req.connection, REQUEST_DROP), call is not None
        headers = [(k, _accept_encoding(v) if metered and lk == b"accept-encoding" else v)
                   for k, v in req.headers if (lk := k.lower()) not in drop]
        if call is not None:
            call.model, call.request_body = model_of(body), body
            call.error_type = records.CONNECTION  # from here, ending with no response is the upstream's
            call.in_flight = True  # in flight: waiting on the API (an upload in progress is not)
            self.metrics.started(self.target, SOURCE)
        wire = self.pool.request_bytes(req.method, self.prefix + req.target, headers, body)
        try:  # a client that hangs up on a silent upstream ends the upstream side too
            ex = await self.pool.send(req.method, wire, lambda ex: setattr(conn, "on_lost", ex.client_gone))
        except ClientGone:
            return self._failed(req, call, 0, records.CLIENT_DISCONNECT, "client went away", "client_disconnect")
        except UpstreamTimeout as exc:
            return self._failed(req, call, 504, records.TIMEOUT, "upstream did not answer in time",
                                "upstream_timeout", exc)
        except BadResponse as exc:
            self._log_failure(exc)
            # no detail: a head parse error may quote the peer's bytes
            return self._failed(req, call, 502, records.SERVER_ERROR, "bad upstream response",
                                "bad_upstream_response")
        except UpstreamError as exc:
            self._log_failure(exc)
            return self._failed(req, call, 502, records.CONNECTION, "upstream unreachable",
                                "upstream_unreachable", exc)
        return await self._relay(req, ex, call)

    @staticmethod
    def _failed(req: Request, call: MeteredCall | None, status: int, error_type: str, msg: str, kind: str,
                exc: Exception | None = None) -> bool:
        if call is not None:
            call.code, call.error_type, call.end = status, error_type, perf_counter()
        # connection and timeout texts are fixed phrases and exception class names: no secret, no peer bytes
        detail = f"{msg}: {exc}" if exc is not None and str(exc) else msg
        return _error(req, status or 400, detail, kind, close=not status, error_type=error_type if status else None)

    async def _relay(self, req: Request, ex: Exchange, call: MeteredCall | None) -> bool:
        """Pass the upstream response on: in one write if it is already complete, else chunk by chunk."""
        low, out = ex.low, ex.lines  # (out: the end-to-end header lines, as they came)
        if "connection" in low:  # the names it lists are hop-by-hop too
            drop = _dropped(low["connection"], NOT_RELAYED)
            out = [line for line in out if line.partition(":")[0].lower() not in drop]
        length = ex.length
        feed = None
        if call is not None:
            call.begin(ex.status, low)
            if call.parser is not None or call.body is not None:
                feed = call.feed
        conn = req.conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            ex.abort()
            return self._cut(call, records.CLIENT_DISCONNECT, None)
        keep = req.keep_alive and not conn.closing
        bodyless = req.method == "HEAD" or ex.status in (204, 304)
        if ex.complete:  # headers and body in one write
            pieces = ex.pending
            if feed is not None:
                for data, now in pieces:
                    feed(data, now)
            body = b"" if bodyless else pieces[0][0] if len(pieces) == 1 else b"".join(d for d, _ in pieces)
            if bodyless:
                extra = f"Content-Length: {length}\r\n" if length is not None and ex.status != 204 else ""
            else:
                extra = f"Content-Length: {len(body)}\r\n"
            transport.write(_head(ex.status, ex.reason, out, extra + _connection(req, keep)) + body)
            if call is not None:
                call.end = perf_counter()
            return keep
        if length is not None:
            chunked, extra = False, f"Content-Length: {length}\r\n"
        elif req.version == "1.1":
            chunked, extra = True, "Transfer-Encoding: chunked\r\n"
        else:  # an HTTP/1.0 client: the end of the body is the end of the connection
            chunked, extra, keep = False, "", False
        transport.write(_head(ex.status, ex.reason, out, extra + _connection(req, keep)))
        ex.attach(*_sink(transport, chunked, feed, ex))
        try:
            return await self._stream(req, ex, call, chunked, keep)
        finally:
            ex.sink = ex.whole = None  # their closures hold the exchange: no cycle left for the GC to find

    async def _stream(self, req: Request, ex: Exchange, call: MeteredCall | None, chunked: bool, keep: bool) -> bool:
        """Wait while the upstream connection pushes the body to the client; then finish the response."""
        try:
            await ex.done
        except ClientGone:
            return self._cut(call, records.CLIENT_DISCONNECT, None)
        except UpstreamTimeout:
            return self._cut(call, records.TIMEOUT, req)
        except UpstreamError:
            return self._cut(call, records.STREAM_BROKEN, req)
        except asyncio.CancelledError:  # only close() cancels a handler
            ex.abort()
            self._cut(call, records.STREAM_BROKEN if self.closing else records.CLIENT_DISCONNECT, req)
            raise
        transport = req.conn.transport
        if transport is None or transport.is_closing():
            return self._cut(call, records.CLIENT_DISCONNECT, None)
        if chunked:
            transport.write(b"0\r\n\r\n")
        if call is not None:
            call.end = perf_counter()
        return keep

    @staticmethod
    def _cut(call: MeteredCall | None, error_type: str, req: Request | None) -> bool:
        """End a relayed call early; with `req`, also drop the client's connection."""
        if call is not None:
            call.fail(error_type)
            call.end = perf_counter()
        if req is not None:
            req.conn.close()  # flushes what was written, then FIN: the client sees an unfinished body
        return False


def _connection(req: Request, keep: bool) -> str:
    return "Connection: close\r\n" if not keep else "Connection: keep-alive\r\n" if req.version == "1.0" else ""


def _sink(transport: asyncio.WriteTransport, chunked: bool, feed, ex: Exchange):
    """The per-chunk path, (sink, whole) for Exchange.attach: write to the client, then meter; `whole` (for
    chunked clients) writes a read that is one whole upstream chunk as it came, framing and all. Runs in
    the upstream's data_received: nothing here may block or raise but ClientGone."""
    write, closing, buffered = transport.write, transport.is_closing, transport.get_write_buffer_size

    def sink(data: bytes, now: float) -> None:
        if closing():
            raise ClientGone
        write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
        if feed is not None:
            feed(data, now)
        if buffered() > HIGH_WATER:
            ex.pause(transport)

    def whole(framed: bytes, start: int, now: float) -> None:
        if closing():
            raise ClientGone
        write(framed)
        if feed is not None:
            feed(framed[start:-2], now)
        if buffered() > HIGH_WATER:
            ex.pause(transport)
    return sink, whole if chunked else None


async def start_proxy(host: str, port: int, upstream: str, target: str, metrics: CallMetrics,
                      max_body_bytes: int = 10 * 1024 * 1024, timeout_s: float = 300,
                      connect_timeout_s: float = 10, ssl_context: ssl.SSLContext | None = None,
                      limits: Limits | None = None, on_refused=None, call_log=None,
                      reuse_port: bool = False) -> ProxyServer:
    """Start the metering proxy on host:port (0 = a free port) in the running event loop.

    `timeout_s` bounds the wait for the upstream's response head and every silence in its body;
    a stream may last longer as long as it keeps sending. An https upstream is verified against the
    system's CAs, or against `ssl_context` (e.g. a private cluster's CA) when one is given. `limits`
    bound what a client may hold (opskit.sidecar.proxy_http); `on_refused()` is called for each
    connection refused at the cap; `call_log` (opskit.sidecar.call_log) records each metered call.
    `reuse_port`: share the port with other processes (SO_REUSEPORT, as the proxy workers do)."""
    proxy = _Proxy(upstream, target, metrics, timeout_s, connect_timeout_s, ssl_context, call_log)
    server = Server(proxy.handle, limits or Limits(), log, "proxy", on_refused, max_body_bytes)
    try:
        bound = await server.start(host, port, reuse_port)
    except BaseException:
        await server.close()
        await proxy.pool.close()
        raise
    return ProxyServer(proxy, server, bound)
