"""Reading a client's request body for the metering proxy, within bounds.

The proxy forwards a request only once it has its whole body (the upstream client sends each request
in one write), so this is where a client can hold the proxy: `read` answers `Expect: 100-continue`
(clients otherwise wait out their expect timeout, ~1 s for curl, before sending the body), refuses a
body over the size limit (Content-Length first, then counted while read), and bounds the read in time.
Each way it can end without a body is an exception the proxy turns into its answer and its count.
"""

from __future__ import annotations

import asyncio

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError


class NoBody(Exception):
    """The request has no body to forward; `status` is the proxy's answer (0: the client is gone)."""

    status, kind, message = 400, "invalid_request", "malformed request body"


class TooLarge(NoBody):
    status, kind = 413, "request_too_large"


class TooSlow(NoBody):
    status, kind, message = 408, "request_timeout", "request body not received in time"


class ClientLeft(NoBody):
    status, kind, message = 0, "client_disconnect", "client went away while sending its body"


async def read(request: web.BaseRequest, max_bytes: int, timeout_s: float) -> bytes:
    """The whole request body, or NoBody (TooLarge, TooSlow, ClientLeft, or a malformed framing)."""
    length = request.content_length
    if length is not None and length > max_bytes:  # said up front: no 100 Continue, no upload
        raise TooLarge(f"request body over {max_bytes} bytes")
    if not request.body_exists:
        return b""
    try:
        if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
        if request.content.is_eof():  # the whole body came with the head (the usual case): no timer
            return await _read(request, max_bytes)
        async with asyncio.timeout(timeout_s):
            return await _read(request, max_bytes)
    except TimeoutError:
        raise TooSlow(TooSlow.message) from None
    except (RequestPayloadError, HttpProcessingError):
        raise NoBody(NoBody.message) from None
    except OSError:  # ConnectionResetError: the client hung up mid-upload
        raise ClientLeft(ClientLeft.message) from None


async def _read(request: web.BaseRequest, max_bytes: int) -> bytes:
    parts, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"request body over {max_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)
