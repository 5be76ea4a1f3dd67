"""The metering proxy against hostile peers: an upstream that sends whatever bytes a test scripts
(gzip bombs, endless SSE lines, garbage `usage`, broken heads), and raw-socket clients that misbehave.

Every peer is on 127.0.0.1 and every exchange is bounded (socket timeouts, a few MiB at most on the
wire). What is asserted is what the client got and how the call was counted, never how long it took
(bench/hostile_upstream.py measures that).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import socket
import threading
import time
import tracemalloc
import zlib

import httpx2 as httpx
import pytest

from opskit.sidecar.http_guard import Limits
from tests.test_proxy import MODEL, TARGET, TIMEOUT, loop_thread, proxy_factory  # noqa: F401 (fixtures)

LABELS = {"target": TARGET, "source": "proxy", "model": MODEL}


# ---------------------------------------------------------------- an upstream that sends scripted bytes

async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Read one request: (its head, its Content-Length body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


@pytest.fixture
def raw_upstream(loop_thread):  # noqa: F811
    """Factory: raw_upstream(respond, seen=None) -> root URL of a server that, for each request, appends
    (head, body) to `seen` if given, awaits respond(reader, writer) and then closes the connection."""
    servers = []

    def start(respond, seen: list | None = None) -> str:
        async def handle(reader, writer):
            try:
                request = await read_request(reader)
                if seen is not None:
                    seen.append(request)
                await respond(reader, writer)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        async def serve():
            return await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)  # (heads up to 1 MiB)

        server = loop_thread.run(serve())
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        loop_thread.loop.call_soon_threadsafe(server.close)


def _head(status: str = "200 OK", ctype: str = "application/json", extra: str = "", length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Connection: close\r\n"
    return f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{extra}{framing}\r\n".encode()


def _replying(data: bytes, pieces: int = 1):
    """A respond() that writes `data` in `pieces` writes (draining between them)."""
    async def respond(reader, writer):
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            writer.write(data[i:i + step])
            await writer.drain()
    return respond


def _post(url: str, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=TIMEOUT, **kw)


def _sha_of_stream(url: str) -> bytes:
    """SHA-256 of the raw response body (no decoding), read piece by piece: the client holds no copy."""
    digest = hashlib.sha256()
    with httpx.stream("POST", url + "/v1/chat/completions", json={"model": MODEL}, timeout=TIMEOUT) as r:
        for piece in r.iter_raw():
            digest.update(piece)
    return digest.digest()


def _stream_body(usage: str) -> bytes:
    return (b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
            b'data: {"choices": [], "usage": ' + usage.encode() + b'}\n\ndata: [DONE]\n\n')


# ---------------------------------------------------------------- 3: whatever `usage` holds, the call is counted once

GARBAGE = ['"x"', "Infinity", "-Infinity", "NaN", "[1]", "-3", "1e400", "123456789012345678901234567890", "true",
           '{"a": 1}', "null"]


@pytest.mark.parametrize("value", GARBAGE)
def test_garbage_usage_counts_the_call_once(raw_upstream, proxy_factory, value):  # noqa: F811
    usage = '{"prompt_tokens": VALUE, "completion_tokens": VALUE}'.replace("VALUE", value)
    json_body = b'{"choices": [{"message": {"content": "hi"}}], "usage": ' + usage.encode() + b"}"
    sse = _stream_body(usage)
    up_json = raw_upstream(_replying(_head(length=len(json_body)) + json_body))
    up_sse = raw_upstream(_replying(_head(ctype="text/event-stream") + sse, pieces=3))
    pj, ps = proxy_factory(up_json), proxy_factory(up_sse)
    assert _post(pj.url).content == json_body
    assert _post(ps.url).content == sse
    for p in (pj, ps):
        assert p.settle(1) == 1 and p.count(200) == 1  # counted, once, as the success it was
        assert p.value("opskit_llm_requests_in_flight", target=TARGET, source="proxy") == 0
        rec = p.metrics.records[0]
        assert rec.text_chunks >= 1  # the text was metered (a non-streamed call has no TTFT)
        if value == "null":  # absent counts: zero tokens from usage, as before
            assert (rec.input_tokens, rec.tokens_from_usage) == (0, True)
        else:  # garbage: tokens unknown (a stream falls back to counting its one text chunk)
            assert not rec.tokens_from_usage and rec.input_tokens == 0
            assert rec.output_tokens == (1 if p is ps else 0)


def test_odd_json_shapes_count_the_call_once(raw_upstream, proxy_factory):  # noqa: F811
    bodies = [b'{"choices": 5, "usage": 7}', b"[" * 50_000 + b"]" * 50_000, b'"just a string"', b"\xff\xfe"]
    for body in bodies:
        p = proxy_factory(raw_upstream(_replying(_head(length=len(body)) + body)))
        assert _post(p.url).content == body
        assert p.settle(1) == 1 and p.count(200) == 1
        assert p.value("opskit_llm_requests_in_flight", target=TARGET, source="proxy") == 0


# ---------------------------------------------------------------- 1: a gzip bomb is decoded within bounds

BOMB_MIB = 64


@functools.cache
def _bomb(prefix: bytes = b"") -> bytes:
    """gzip of `prefix` + BOMB_MIB MiB of zeros (~65 KB on the wire)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return c.compress(prefix) + b"".join(c.compress(zeros) for _ in range(BOMB_MIB)) + c.flush()


@pytest.mark.parametrize("ctype, prefix", [("application/json", b'{"choices": "'),
                                           ("text/event-stream", b"data: ")])
def test_gzip_bomb_is_relayed_unchanged_and_metered_within_bounds(raw_upstream, proxy_factory, ctype, prefix):  # noqa: F811
    bomb = _bomb(prefix)
    head = _head(ctype=ctype, extra="Content-Encoding: gzip\r\n", length=len(bomb))
    p = proxy_factory(raw_upstream(_replying(head + bomb, pieces=16)))
    tracemalloc.start()
    try:
        got = _sha_of_stream(p.url)
        assert p.settle(1) == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == hashlib.sha256(bomb).digest()  # the client gets the upstream's bytes, still gzip
    # Decoding a copy for metering never held the 64 MiB it inflates to: at most the JSON meter's
    # 4 MiB cap (and a few 256 KiB pieces) at once.
    assert peak < 8 * 1024 * 1024, peak
    assert p.metrics.records[0].tokens_from_usage is False
    # The JSON body is passed but not metered (over the meter's cap); the stream's one endless line
    # is a broken stream for metering, as it would be for an SDK.
    assert p.count(200, "" if ctype == "application/json" else "stream_broken") == 1


# ---------------------------------------------------------------- 2: an endless SSE line is bounded

def test_endless_sse_line_in_small_writes_is_relayed_and_counted_broken(raw_upstream, proxy_factory):  # noqa: F811
    line = b"data: " + b"x" * (4 * 1024 * 1024) + b"\n\n"  # 4x the parser's bound, sent 4 KiB at a time
    body = line + _stream_body('{"prompt_tokens": 1, "completion_tokens": 1}')
    p = proxy_factory(raw_upstream(_replying(_head(ctype="text/event-stream") + body, pieces=len(body) // 4096)))
    tracemalloc.start()
    try:
        got = _sha_of_stream(p.url)
        assert p.settle(1) == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == hashlib.sha256(body).digest()  # the client gets every byte
    assert p.count(200, "stream_broken") == 1  # metering gave up on the line: not a success
    assert peak < 3 * 1024 * 1024, peak  # the parser held at most its 1 MiB bound of the 4 MiB line


# ---------------------------------------------------------------- 7: a head the proxy cannot relay is a counted 502

@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: b\nX-Smuggled: c\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\rX-B: c\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 999 Beyond\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 099 Below\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Bin: \x00\r\nContent-Length: 2\r\n\r\n",
])
def test_bad_upstream_head_is_a_counted_502(raw_upstream, proxy_factory, head):  # noqa: F811
    p = proxy_factory(raw_upstream(_replying(head + b"{}")))
    r = _post(p.url)
    assert r.status_code == 502 and r.json()["error"]["type"] == "bad_upstream_response"
    assert p.settle(1) == 1 and p.count(502, "server_error") == 1  # what the client got is what is counted


# ---------------------------------------------------------------- raw-socket clients

def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _until_closed(s: socket.socket) -> bytes:
    """Everything the proxy sends until it closes the connection (socket.timeout after 5 s of silence)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _wait(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def _post_head(length: int, extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n" + extra + b"\r\n")


BODY = json.dumps({"model": MODEL, "messages": []}).encode()
OK_JSON = _head(length=2) + b"{}"


class _Seen:
    """What the scripted upstream saw, readable from the test's thread."""

    def __init__(self) -> None:
        self.requests, self.closed = threading.Event(), threading.Event()
        self.count = 0

    def silent(self):
        """A respond() that answers nothing and notes when the proxy closes the connection."""
        async def respond(reader, writer):
            self.count += 1
            self.requests.set()
            await reader.read()  # EOF: the proxy dropped the upstream side
            self.closed.set()
        return respond

    def silent_after(self, data: bytes):
        async def respond(reader, writer):
            writer.write(data)
            await writer.drain()
            await self.silent()(reader, writer)
        return respond


# ---------------------------------------------------------------- 4: client faults are the client's

def test_deeply_nested_request_body_is_forwarded_not_a_proxy_500(raw_upstream, proxy_factory, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING)
    answer = b'{"error": {"message": "bad json"}}'
    p = proxy_factory(raw_upstream(_replying(_head("400 Bad Request", length=len(answer)) + answer)))
    nested = b"[" * 200_000 + b"]" * 200_000
    r = httpx.post(p.url + "/v1/chat/completions", content=nested, timeout=TIMEOUT)
    assert r.status_code == 400 and r.content == answer  # the upstream judged it
    assert p.settle(1) == 1 and p.count(400, "client_error", model="other") == 1
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_client_leaving_mid_upload_is_a_client_disconnect(raw_upstream, proxy_factory):  # noqa: F811
    seen = _Seen()
    p = proxy_factory(raw_upstream(seen.silent()))
    with _connect(p.server.port) as s:
        s.sendall(_post_head(100_000) + b'{"model": "')
        assert _wait(lambda: p.server.open_calls == 1)  # its handler is reading the body
        assert not p.value("opskit_llm_requests_in_flight", target=TARGET, source="proxy")  # not the API's
    assert p.settle(1) == 1 and p.count(0, "client_disconnect", model="other") == 1
    assert seen.count == 0  # nothing reached the API


def test_drain_cutting_an_upload_is_a_client_disconnect(raw_upstream, proxy_factory, loop_thread):  # noqa: F811
    p = proxy_factory(raw_upstream(_replying(OK_JSON)))
    with _connect(p.server.port) as s:
        s.sendall(_post_head(1000) + b'{"model": "')
        assert _wait(lambda: p.server.open_calls == 1)  # its handler is reading the body
        assert not p.value("opskit_llm_requests_in_flight", target=TARGET, source="proxy")  # not the API's
        loop_thread.run(p.server.close(grace_s=0.2))
    assert p.settle(1) == 1 and p.count(0, "client_disconnect", model="other") == 1


# ---------------------------------------------------------------- 14: a client leaving a silent upstream frees it

@pytest.mark.parametrize("streaming", [False, True])
def test_client_leaving_a_silent_upstream_closes_the_upstream_side(raw_upstream, proxy_factory, streaming):  # noqa: F811
    seen = _Seen()
    first = _head(ctype="text/event-stream") + b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
    p = proxy_factory(raw_upstream(seen.silent_after(first) if streaming else seen.silent()), timeout_s=60)
    with _connect(p.server.port) as s:
        s.sendall(_post_head(len(BODY)) + BODY)
        assert seen.requests.wait(5)
        if streaming:
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
    assert seen.closed.wait(5)  # long before the 60 s upstream timeout
    assert p.settle(1) == 1 and p.count(200 if streaming else 0, "client_disconnect") == 1


# ---------------------------------------------------------------- 6: Expect: 100-continue is answered

def test_expect_100_continue_is_answered_before_the_body(raw_upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(raw_upstream(_replying(OK_JSON)))
    with _connect(p.server.port) as s:
        s.sendall(_post_head(len(BODY), b"Expect: 100-continue\r\n"))
        assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before the body was sent
        s.sendall(BODY)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
    assert p.settle(1) == 1 and p.count(200) == 1


# ---------------------------------------------------------------- 5: timeouts and the connection cap

SHORT = Limits(header_timeout_s=0.3, body_timeout_s=0.3, idle_timeout_s=0.3, max_connections=2)


def test_slowloris_head_and_idle_socket_are_closed(raw_upstream, proxy_factory):  # noqa: F811
    up = raw_upstream(_replying(OK_JSON))
    heads = proxy_factory(up, limits=Limits(header_timeout_s=0.3, idle_timeout_s=30))
    with _connect(heads.server.port) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHo")
        for _ in range(3):
            slow.sendall(b"s")  # still trickling: the head's time counts from its first byte
        assert _until_closed(slow).startswith(b"HTTP/1.1 408 ")
    idles = proxy_factory(up, limits=Limits(header_timeout_s=30, idle_timeout_s=0.3))
    with _connect(idles.server.port) as idle, _connect(idles.server.port) as kept:
        kept.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive after one request
        assert _until_closed(idle) == b""
        assert _until_closed(kept).startswith(b"HTTP/1.1 200 ")
    assert heads.total() == idles.total() == 0  # no head, no call (and /models is not metered)


def test_slow_upload_gets_408_and_is_never_in_flight(raw_upstream, proxy_factory):  # noqa: F811
    seen = _Seen()
    p = proxy_factory(raw_upstream(seen.silent()), limits=SHORT)
    with _connect(p.server.port) as s:
        s.sendall(_post_head(1000) + b"{")
        assert _until_closed(s).startswith(b"HTTP/1.1 408 ")
    assert p.settle(1) == 1 and p.count(408, "client_error", model="other") == 1
    assert not p.value("opskit_llm_requests_in_flight", target=TARGET, source="proxy") and seen.count == 0


def test_connections_over_the_cap_are_refused_and_counted(raw_upstream, proxy_factory):  # noqa: F811
    refused = []
    p = proxy_factory(raw_upstream(_replying(OK_JSON)), limits=Limits(max_connections=2),
                      on_refused=lambda: refused.append(1))
    with _connect(p.server.port) as a, _connect(p.server.port) as b:
        for s in (a, b):  # a whole exchange each: both are surely accepted
            s.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        with _connect(p.server.port) as c:
            assert _until_closed(c).startswith(b"HTTP/1.1 503 ")
    assert refused == [1]
    assert _wait(lambda: p.server.open_connections == 0)
    with _connect(p.server.port) as d:  # room again once they left
        d.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert d.recv(65536).startswith(b"HTTP/1.1 200")


# ---------------------------------------------------------------- 11: malformed requests do not flood the log

def test_malformed_requests_are_logged_once_per_interval_without_traceback(raw_upstream, proxy_factory, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG, logger="opskit.sidecar.proxy")
    p = proxy_factory(raw_upstream(_replying(OK_JSON)))
    for _ in range(5):
        with _connect(p.server.port) as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nNot a header\r\n\r\n")
            assert _until_closed(s).startswith(b"HTTP/1.")  # 400 from the HTTP layer
    lines = [r for r in caplog.records if r.name == "opskit.sidecar.proxy" and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].exc_info is None and "malformed request" in lines[0].getMessage()

