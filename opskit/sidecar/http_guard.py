"""Guards for the exporter's two listeners (the metering proxy and /metrics): what any client may cost.

aiohttp's low-level server as it comes waits for ever on a client: a request head sent at 1 byte/s
(slowloris), a connection that never sends anything (its keep-alive timeout is an hour), any number
of such connections; and it logs a traceback at ERROR for every malformed request, a log flood that
any client controls. `GuardedServer` is that server with:

- a connection cap: a connection beyond `Limits.max_connections` is answered 503 and closed at once,
  and `on_refused()` is called (the exporter counts it in `opskit_exporter_connections_refused_total`);
- a header timeout: from the first byte of a request head to its end (408, then close);
- an idle timeout: a keep-alive connection with no request for that long is closed (aiohttp's own
  keep-alive timer, which also closes a connection that never sends a request);
- `on_lost`: a callback a handler may set on its connection (the proxy drops the upstream side of a
  call whose client hung up while the upstream was silent);
- its error log throttled: at most one line per `LOG_EVERY_S`, no traceback for a malformed request,
  with a count of those not logged.

The body read timeout is the handler's (only it knows when it reads a body): see opskit.sidecar.proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

LOG_EVERY_S = 10.0  # client and upstream failures are logged at most this often
LINGER_S = 1.0      # after an early answer, what the client still sends is read and dropped this long



def plain(status: str, text: str, extra: str = "") -> bytes:
    """A whole closing response, written straight to a transport (no request object exists for it)."""
    body = text.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n{extra}"
            f"Connection: close\r\n\r\n").encode() + body


REFUSED = plain("503 Service Unavailable", "too many connections\n", "Retry-After: 1\r\n")
HEAD_TIMEOUT = plain("408 Request Timeout", "request head not received in time\n")


@dataclass(frozen=True)
class Limits:
    """What one client may hold of a listener (exporter flags; the defaults are the flags' defaults)."""

    header_timeout_s: float = 10.0  # first byte of a request head -> its end
    body_timeout_s: float = 60.0    # request head -> the end of its body (the proxy's 408)
    idle_timeout_s: float = 30.0    # a keep-alive connection with no request for this long is closed
    max_connections: int = 1024     # open client connections; more are answered 503 and closed


class Throttle:
    """At most one event per `every_s` gets through; `take()` says how many were held back since."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._at, self._held = -every_s, 0

    def take(self) -> int | None:
        """None: hold this one back. Else the number held back since the last one let through."""
        now = perf_counter()
        if now - self._at < self.every_s:
            self._held += 1
            return None
        held, self._at, self._held = self._held, now, 0
        return held


class ThrottledLog:
    """The logger aiohttp's RequestHandler calls (`exception`, `warning`, `debug`), throttled: a client
    sending malformed requests gets one line per LOG_EVERY_S, not a traceback per request."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log, self._what, self._throttle = log, what, Throttle()

    def exception(self, msg, *args, exc_info=None, **kw) -> None:
        held = self._throttle.take()
        if held is None:
            return
        since = f" ({held} more since the last such line)" if held else ""
        if isinstance(exc_info, HttpProcessingError):  # the client's fault: one line, no traceback
            self._log.warning("%s: malformed request: %s%s", self._what, _one_line(exc_info), since)
        else:
            self._log.error("%s: %s%s", self._what, msg % args if args else msg, since, exc_info=exc_info)

    def warning(self, msg, *args, **kw) -> None:
        self._log.warning(msg, *args, **kw)

    def debug(self, msg, *args, **kw) -> None:
        self._log.debug(msg, *args, **kw)


def _one_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:200]


class GuardedServer(web.Server):
    """aiohttp's low-level web.Server with the guards above."""

    def __init__(self, handler, limits: Limits, log: logging.Logger, what: str,
                 on_refused: Callable[[], None] | None = None, **kwargs) -> None:
        # lingering: after an early answer (413, 408) read and drop what the client still sends, so it
        # sees the answer rather than a reset, but for 1 s, not aiohttp's 10 s: that is a slow client's time
        super().__init__(handler, keepalive_timeout=limits.idle_timeout_s, logger=ThrottledLog(log, what),
                         access_log=None, lingering_time=LINGER_S, **kwargs)
        self.limits, self.on_refused = limits, on_refused

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def admit(self, transport: asyncio.Transport) -> bool:
        """False (after answering 503 and closing) when the cap is reached."""
        if len(self._connections) < self.limits.max_connections:
            return True
        transport.write(REFUSED)
        transport.close()
        if self.on_refused is not None:
            self.on_refused()
        return False


class GuardedHandler(RequestHandler):
    """One client connection: aiohttp's RequestHandler plus the cap, the header timer and `on_lost`."""

    __slots__ = ("_head_timer", "_head_count", "on_lost")

    def __init__(self, manager: GuardedServer, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = 0
        self.on_lost: Callable[[], None] | None = None

    def connection_made(self, transport) -> None:
        if not self._manager.admit(transport):
            self._manager = None  # never registered: connection_lost has nothing to undo
            return
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Part of a request head arrived and not its end (a complete head is queued in _messages, and
        # a request being handled is reading its body): the rest has header_timeout_s to come.
        if (self._head_timer is None and not self._request_in_progress and not self._messages
                and not self._force_close and self.transport is not None and self._manager is not None):
            self._head_count = self._request_count
            self._head_timer = self._loop.call_later(self._manager.limits.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if (self._request_count != self._head_count or self._request_in_progress or self._messages
                or self.transport is None):
            return  # the head did arrive (and perhaps its response went out): nothing is late
        self.transport.write(HEAD_TIMEOUT)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        on_lost, self.on_lost = self.on_lost, None
        super().connection_lost(exc)
        if on_lost is not None:
            on_lost()
