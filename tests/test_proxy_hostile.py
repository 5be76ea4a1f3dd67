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
import tracemalloc
import zlib

import httpx2 as httpx
import pytest

from tests.test_proxy import MODEL, TARGET, TIMEOUT, loop_thread, proxy_factory  # noqa: F401 (fixtures)

LABELS = {"target": TARGET, "source": "proxy", "model": MODEL}


# ---------------------------------------------------------------- an upstream that sends scripted bytes

async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one request (head and Content-Length body); its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return head


@pytest.fixture
def raw_upstream(loop_thread):  # noqa: F811
    """Factory: raw_upstream(respond) -> root URL of a server that, for each request, awaits
    respond(reader, writer) and then closes the connection."""
    servers = []

    def start(respond) -> str:
        async def handle(reader, writer):
            try:
                await _read_request(reader)
                await respond(reader, writer)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        async def serve():
            return await asyncio.start_server(handle, "127.0.0.1", 0)

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
        assert rec.ttft_s is not None  # the text was metered
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
