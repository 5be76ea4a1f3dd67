"""One request as the metering proxy's client side parsed it (opskit.sidecar.proxy_http), and its body.

The proxy forwards a request only once it has its whole body (the upstream client sends each request
in one write), so `read_body` is where a client can hold the proxy: it answers `Expect: 100-continue`
(clients otherwise wait out their expect timeout, ~1 s for curl, before sending the body), refuses a
body over the size limit (Content-Length first, then counted while it arrives), and bounds the wait in
time. Each way it can end without a body is a BodyError the proxy turns into its answer and its count.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opskit.sidecar.proxy_http import Conn

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyError(Exception):
    """The request has no body to forward; `status` is the proxy's answer (0: the client is gone)."""

    status, kind, message = 400, "invalid_request", "malformed request body"


class TooLarge(BodyError):
    status, kind = 413, "request_too_large"


class TooSlow(BodyError):
    status, kind, message = 408, "request_timeout", "request body not received in time"


class ClientLeft(BodyError):
    status, kind, message = 0, "client_disconnect", "client went away while sending its body"


class Request:
    """One request as parsed: method, raw target, version, headers (bytes pairs, as sent) and its body."""

    __slots__ = ("conn", "method", "target", "version", "headers", "parts", "size", "length", "complete",
                 "keep_alive", "expect", "connection", "waiter", "failure", "t0", "hosts", "in_body")

    def __init__(self, conn: Conn, t0: float) -> None:
        self.conn, self.t0 = conn, t0
        self.method, self.target, self.version = "GET", "", "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.length: int | None = None      # Content-Length as sent
        self.complete = False                # the whole body is in
        self.keep_alive = True
        self.expect = False                  # Expect: 100-continue
        self.connection = b""                # the Connection header (its tokens are hop-by-hop too)
        self.waiter: asyncio.Future | None = None
        self.failure: BodyError | None = None
        self.hosts = 0                       # Host fields seen (HTTP/1.1 needs exactly one)
        self.in_body = False                 # head done: fields now are trailers (dropped)

    def header(self, lname: bytes) -> str | None:
        """The first value of a header by its lower-case name (bytes as sent, decoded losslessly)."""
        for k, v in self.headers:
            if k.lower() == lname:
                return v.decode("utf-8", "surrogateescape")
        return None

    def body_if_in(self) -> bytes | None:
        """The whole body when it is already in and within the limit (a request's usual state when its
        handler starts: no wait and no coroutine); None: `read_body` says what else."""
        if self.complete and self.failure is None and (self.length is None or self.length <= self.conn.server.max_body):
            return self._joined()
        return None

    async def read_body(self) -> bytes:
        """The whole body, or BodyError (TooLarge, TooSlow, ClientLeft, or a malformed framing), within the
        listener's body limit (the connection counts what arrives against it) and body timeout."""
        conn = self.conn
        max_bytes = conn.server.max_body
        if self.length is not None and self.length > max_bytes:  # said up front: no 100 Continue, no upload
            raise TooLarge(f"request body over {max_bytes} bytes")
        if not self.complete and self.failure is None:
            if self.expect and self.version == "1.1" and conn.transport is not None:
                conn.transport.write(CONTINUE)
            self.waiter = conn.loop.create_future()
            try:
                async with asyncio.timeout(conn.server.limits.body_timeout_s):
                    await self.waiter
            except TimeoutError:
                raise TooSlow(TooSlow.message) from None
            finally:
                self.waiter = None
        if self.failure is not None:
            raise self.failure
        return self._joined()

    def _joined(self) -> bytes:
        parts = self.parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _wake(self, failure: BodyError | None = None) -> None:
        if failure is not None and self.failure is None:
            self.failure = failure
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
