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
  out): a body over `max_body_bytes` -> 413, not received within the body timeout -> 408 (see
  opskit.sidecar.request_body); a client hanging up, or the drain cutting it, before its body is in
  -> 0/client_disconnect, and nothing is sent upstream. A body the proxy cannot parse (not JSON, nested
  too deep) is forwarded as it is: the upstream judges it.
- A client that hangs up while the upstream is silent (before the head, or between chunks) is noticed
  by its connection (opskit.sidecar.http_guard's `on_lost`): the upstream connection is closed at once
  and the call ends client_disconnect, instead of both waiting out `timeout_s`.
- Authorization and every other header pass through untouched; headers are never logged (a call log,
  opskit.sidecar.call_log, gets each finished call off the loop and keeps a keyed hash of Authorization).
  The path and body are forwarded byte for byte (a compressed request body too), so HMAC-signed
  requests stay valid, as long as the upstream URL has no path prefix (a prefix is prepended to every
  path, changing what was signed).
- Metered calls get `Accept-Encoding` narrowed to gzip/deflate/identity, so a copy of a compressed body
  can be decoded for metering (bounded: opskit.sidecar.metering); the client gets the upstream's bytes.
- Not proxied: WebSocket upgrades (hop-by-hop). Every client is bounded by http_guard (header and idle
  timeouts, a connection cap, a throttled log for malformed requests).
Speed: opskit.sidecar.upstream_client pushes each body piece from `data_received` through `_sink` (write
to the client, then meter), no task switch per chunk; a body complete with its head goes out in one write
with the headers; no reference cycle per call (the GC finds none). Cost: bench/proxy_overhead.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from time import perf_counter
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict

from opskit.core import records
from opskit.sidecar import request_body
from opskit.sidecar.call_metrics import CallMetrics
from opskit.sidecar.http_guard import GuardedServer, Limits, Throttle
from opskit.sidecar.metering import SOURCE, MeteredCall, model_of
from opskit.sidecar.upstream_client import Pool
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
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
# Also dropped from requests: opskit.sidecar.upstream_client writes Host and Content-Length itself, and it sends the
# body at once, so an Expect: 100-continue (the proxy already answered it) must not reach the upstream.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
DECODABLE = {"gzip", "x-gzip", "deflate", "identity"}


def _dropped(headers, base: frozenset[str]) -> frozenset[str]:
    """Hop-by-hop names plus any the Connection header lists (RFC 9110 7.6.1)."""
    conn = headers.get("Connection")
    if not conn:
        return base
    return base | {t.strip().lower() for t in conn.split(",")}


def _accept_encoding(value: str) -> str:
    """The codings of an Accept-Encoding value the meter can decode (identity if none)."""
    keep = [t for t in value.split(",") if t.split(";")[0].strip().lower() in DECODABLE]
    return ",".join(keep).strip() or "identity"


ERROR_TYPE_HEADER = "X-Opskit-Error-Type"


def _error(status: int, message: str, kind: str, close: bool = False, error_type: str | None = None) -> web.Response:
    """A small OpenAI-style error body produced by the proxy itself. On its own 502/504 the header
    ERROR_TYPE_HEADER names the error type the exporter counts (connection, timeout, server_error), so
    the client sees why without the exporter's log."""
    body = json.dumps({"error": {"message": message, "type": kind, "source": "opskit-proxy"}})
    resp = web.Response(status=status, text=body, content_type="application/json",
                        headers={ERROR_TYPE_HEADER: error_type} if error_type else None)
    if close:
        resp.force_close()
    return resp


class _WholeResponse(web.StreamResponse):
    """A response whose body is complete before it is sent: headers and body go out in one write."""

    _send_headers_immediately = False  # what aiohttp's own web.Response does


class ProxyServer:
    """A running proxy. `port` is the bound port; `close()` drains and stops it."""

    def __init__(self, proxy: _Proxy, runner: web.ServerRunner, port: int) -> None:
        self._proxy, self._runner, self.port = proxy, runner, port
        self._closed = False

    @property
    def finished_calls(self) -> int:
        """Metered calls counted so far (each once)."""
        return self._proxy.finished

    @property
    def open_calls(self) -> int:
        """Metered calls being handled now: uploading, waiting for the upstream or relaying."""
        return len(self._proxy.tasks)

    @property
    def open_connections(self) -> int:
        """Client connections open now (what the connection cap counts)."""
        server = self._runner.server
        return len(server.connections) if server is not None else 0

    async def close(self, grace_s: float = 10) -> None:
        """Stop accepting, let in-flight calls finish for up to `grace_s`, cut the rest, close. Calls cut
        at the deadline are recorded as stream_broken: the client sees its stream break. Twice is harmless."""
        if self._closed:
            return
        self._closed = True
        for site in list(self._runner.sites):
            await site.stop()
        tasks = set(self._proxy.tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            self._proxy.closing = True
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self._runner.cleanup()
        await self._proxy.pool.close()


class _Proxy:
    """The request handler and its upstream connection pool."""

    def __init__(self, upstream: str, target: str, metrics: CallMetrics, max_body_bytes: int,
                 timeout_s: float, connect_timeout_s: float, ssl_context: ssl.SSLContext | None,
                 limits: Limits, call_log=None) -> None:
        url = urlsplit(upstream)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream must be an http:// or https:// URL, got scheme {url.scheme!r}")
        self.prefix = url.path.rstrip("/")  # an upstream path prefix is prepended to every request path
        self.target, self.metrics, self.max_body = target, metrics, max_body_bytes
        self.tasks: set[asyncio.Task] = set()
        self.closing = False
        self.finished = 0  # metered calls counted so far (the exporter lingers until a scrape has them all)
        self.limits, self.call_log = limits, call_log
        self.pool = Pool(upstream, connect_timeout_s, timeout_s, ssl_context)
        self._throttle = Throttle()
        self.loop = asyncio.get_running_loop()

    def _log_failure(self, exc: Exception) -> None:
        """At most one line per LOG_EVERY_S, with a count of the failures since: with the upstream down,
        a line per call would flood the sidecar's log at the traffic's rate (the metrics count each)."""
        held = self._throttle.take()
        if held is not None:
            since = f" ({held} more since the last such line)" if held else ""
            log.warning("upstream of %s failed: %s%s", self.target, exc, since)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Entry point for every request the proxy receives."""
        t0 = perf_counter()
        if request.method == "CONNECT":
            return _error(405, "CONNECT is not supported: this is a reverse proxy", "method_not_allowed", True)
        if not request.raw_path.startswith("/"):
            return _error(400, "absolute-form request targets are refused: this proxy forwards only to its "
                          "configured upstream", "invalid_request", True)
        if request.method != "POST" or not request.path.endswith(METERED_SUFFIXES):
            return await self._forward(request, None)
        call = MeteredCall(t0, self.call_log.capture if self.call_log is not None else 0)
        task = asyncio.current_task(self.loop)  # with the loop: no getpid() syscall on Python 3.11
        self.tasks.add(task)
        try:
            return await self._forward(request, call)
        except asyncio.CancelledError:  # close() cut it wherever it was; a relayed stream says more
            call.fail(records.STREAM_BROKEN if self.closing else records.CLIENT_DISCONNECT)
            raise
        finally:
            request.protocol.on_lost = None  # the connection may carry another call: not this one's exchange
            self.tasks.discard(task)
            rec = call.record(self.target, self.metrics.model_label(self.target, call.model))
            (self.metrics.finished if call.in_flight else self.metrics.observe)(rec)
            if self.call_log is not None:
                self.call_log.submit(rec, call, request.headers.get("Authorization"))
            self.finished += 1

    async def _forward(self, request: web.BaseRequest, call: MeteredCall | None) -> web.StreamResponse:
        try:
            body = await request_body.read(request, self.max_body, self.limits.body_timeout_s)
        except request_body.NoBody as exc:  # the client's error, counted as one; nothing reached the API
            if call is not None:
                call.end = perf_counter()
                if exc.status:  # else: code 0 / client_disconnect, as the call started
                    call.code, call.error_type = exc.status, records.CLIENT_ERROR
            return _error(exc.status or 400, str(exc), exc.kind, True)
        transport = request.transport
        if transport is None or transport.is_closing():  # the client left with its upload: nothing to send
            if call is not None:
                call.end = perf_counter()
            return _error(400, "client went away", "client_disconnect", True)
        drop = _dropped(request.headers, REQUEST_DROP)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in drop]
        if call is not None:
            call.model, call.request_body = model_of(body), body
            headers = [(k, _accept_encoding(v) if k.lower() == "accept-encoding" else v) for k, v in headers]
            call.error_type = records.CONNECTION  # from here, ending with no response is the upstream's
            call.in_flight = True  # in flight: waiting on the API (an upload in progress is not)
            self.metrics.started(self.target, SOURCE)
        wire = self.pool.request_bytes(request.method, self.prefix + request.raw_path, headers, body)
        proto = request.protocol  # a client that hangs up on a silent upstream ends the upstream side too
        try:
            ex = await self.pool.send(request.method, wire, lambda ex: setattr(proto, "on_lost", ex.client_gone))
        except ClientGone:
            return self._failed(call, 0, records.CLIENT_DISCONNECT, "client went away", "client_disconnect")
        except UpstreamTimeout as exc:
            return self._failed(call, 504, records.TIMEOUT, "upstream did not answer in time", "upstream_timeout",
                                exc)
        except BadResponse as exc:
            self._log_failure(exc)
            # no detail: a head parse error may quote the peer's bytes
            return self._failed(call, 502, records.SERVER_ERROR, "bad upstream response", "bad_upstream_response")
        except UpstreamError as exc:
            self._log_failure(exc)
            return self._failed(call, 502, records.CONNECTION, "upstream unreachable", "upstream_unreachable", exc)
        return await self._relay(request, ex, call)

    def _failed(self, call: MeteredCall | None, status: int, error_type: str, msg: str, kind: str,
                exc: Exception | None = None) -> web.Response:
        if call is not None:
            call.code, call.error_type, call.end = status, error_type, perf_counter()
        # connection and timeout texts are fixed phrases and exception class names: no secret, no peer bytes
        detail = f"{msg}: {exc}" if exc is not None and str(exc) else msg
        return _error(status, detail, kind, error_type=error_type if status else None)

    async def _relay(self, request: web.BaseRequest, ex: Exchange, call: MeteredCall | None) -> web.StreamResponse:
        """Pass the upstream response on: in one write if it is already complete, else chunk by chunk."""
        up = CIMultiDict(ex.headers)
        drop = _dropped(up, RESPONSE_DROP)
        out = CIMultiDict((k, v) for k, v in ex.headers if k.lower() not in drop)
        length = up.get("Content-Length")
        length = int(length) if length and length.isdigit() and "chunked" not in up.get("Transfer-Encoding", "") \
            else None
        feed = None
        if call is not None:
            call.begin(ex.status, up)
            if call.parser is not None or call.body is not None:
                feed = call.feed
        try:
            resp = (_WholeResponse if ex.complete else web.StreamResponse)(status=ex.status, reason=ex.reason,
                                                                            headers=out)
            if length is not None:
                resp.content_length = length
            if ex.complete:
                return await self._whole(request, ex, resp, call, feed)
            await resp.prepare(request)
        except ConnectionError:
            ex.abort()
            return self._cut(call, records.CLIENT_DISCONNECT, None, None)
        except (ValueError, TypeError) as exc:  # a head aiohttp will not write (UnicodeError is a ValueError)
            ex.abort()
            self._log_failure(exc)
            return self._failed(call, 502, records.SERVER_ERROR, "bad upstream response", "bad_upstream_response")
        transport = request.transport
        if transport is None or transport.is_closing():
            ex.abort()
            return self._cut(call, records.CLIENT_DISCONNECT, None, resp)
        # aiohttp picks chunked framing at prepare() (HTTP/1.1, no length) and says so in the headers
        chunked = "chunked" in resp.headers.get("Transfer-Encoding", "")
        ex.attach(_sink(transport, chunked, feed, ex))
        try:
            return await self._stream(request, ex, resp, call)
        finally:
            ex.sink = None  # its closure holds the exchange: no cycle left for the GC to find

    async def _stream(self, request, ex: Exchange, resp: web.StreamResponse, call: MeteredCall | None):
        """Wait while the upstream connection pushes the body to the client; then finish the response."""
        try:
            await ex.done
        except ClientGone:
            return self._cut(call, records.CLIENT_DISCONNECT, None, resp)
        except UpstreamTimeout:
            return self._cut(call, records.TIMEOUT, request, resp)
        except UpstreamError:
            return self._cut(call, records.STREAM_BROKEN, request, resp)
        except asyncio.CancelledError:
            # only close() cancels a handler (aiohttp's handler_cancellation is off)
            ex.abort()
            self._cut(call, records.STREAM_BROKEN if self.closing else records.CLIENT_DISCONNECT, request, resp)
            raise
        try:
            await resp.write_eof()
        except ConnectionError:
            return self._cut(call, records.CLIENT_DISCONNECT, None, resp)
        if call is not None:
            call.end = perf_counter()
        return resp

    async def _whole(self, request, ex: Exchange, resp: web.StreamResponse, call: MeteredCall | None, feed):
        pieces = ex.pending
        if feed is not None:
            for data, now in pieces:
                feed(data, now)
        try:
            await resp.prepare(request)
            await resp.write_eof(pieces[0][0] if len(pieces) == 1 else b"".join(d for d, _ in pieces))
        except ConnectionError:
            return self._cut(call, records.CLIENT_DISCONNECT, None, resp)  # (other errors: see _relay)
        if call is not None:
            call.end = perf_counter()
        return resp

    @staticmethod
    def _cut(call: MeteredCall | None, error_type: str, request, resp: web.StreamResponse | None):
        """End a relayed call early; with `request`, also drop the client's connection."""
        if call is not None:
            call.fail(error_type)
            call.end = perf_counter()
        transport = request.transport if request is not None else None
        if transport is not None:
            transport.close()  # flushes what was written, then FIN: the client sees an unfinished body
        return resp if resp is not None else web.Response(status=400)  # (nobody reads it)


def _sink(transport: asyncio.WriteTransport, chunked: bool, feed, ex: Exchange):
    """The per-chunk path: write to the client (framed if chunked), then meter. Runs inside the
    upstream connection's data_received, so nothing here may block or raise but ClientGone."""
    write, closing, buffered = transport.write, transport.is_closing, transport.get_write_buffer_size

    def sink(data: bytes, now: float) -> None:
        if closing():
            raise ClientGone
        write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
        if feed is not None:
            feed(data, now)
        if buffered() > HIGH_WATER:
            ex.pause(transport)
    return sink


async def start_proxy(host: str, port: int, upstream: str, target: str, metrics: CallMetrics,
                      max_body_bytes: int = 10 * 1024 * 1024, timeout_s: float = 300,
                      connect_timeout_s: float = 10, ssl_context: ssl.SSLContext | None = None,
                      limits: Limits | None = None, on_refused=None, call_log=None,
                      reuse_port: bool = False) -> ProxyServer:
    """Start the metering proxy on host:port (0 = a free port) in the running event loop.

    `timeout_s` bounds the wait for the upstream's response head and every silence in its body;
    a stream may last longer as long as it keeps sending. An https upstream is verified against the
    system's CAs, or against `ssl_context` (e.g. a private cluster's CA) when one is given. `limits`
    bound what a client may hold (opskit.sidecar.http_guard); `on_refused()` is called for each
    connection refused at the cap; `call_log` (opskit.sidecar.call_log) records each metered call.
    `reuse_port`: share the port with other processes (SO_REUSEPORT, as the proxy workers do)."""
    limits = limits or Limits()
    proxy = _Proxy(upstream, target, metrics, max_body_bytes, timeout_s, connect_timeout_s, ssl_context, limits,
                   call_log)
    # auto_decompress off: a compressed request body is forwarded as sent, with its Content-Encoding
    server = GuardedServer(proxy.handle, limits, log, "proxy", on_refused, auto_decompress=False)
    runner = web.ServerRunner(server, shutdown_timeout=1.0)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
    except BaseException:
        await runner.cleanup()
        await proxy.pool.close()
        raise
    return ProxyServer(proxy, runner, site._server.sockets[0].getsockname()[1])
