"""The proxy's upstream HTTP/1.1 client: response parsing fed byte ranges directly (no network), and
connection reuse against a raw asyncio server on loopback."""

from __future__ import annotations

import asyncio

import pytest

from opskit.sidecar.upstream_client import Pool
from opskit.sidecar.upstream_protocol import ClientGone, Conn, UpstreamError, UpstreamTimeout

BODY = b"data: {\"a\": 1}\n\ndata: [DONE]\n\n"
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
           b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
           b"10;ext=1\r\n" + BODY[:16] + b"\r\n" + f"{len(BODY) - 16:x}".encode() + b"\r\n" + BODY[16:] + b"\r\n"
           b"0\r\nX-Trailer: t\r\n\r\n")


class FakeTransport:
    """What Conn needs from a transport, recording what happens to it."""

    def __init__(self) -> None:
        self.written, self.closed, self.aborted, self.paused = [], False, False, False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def _conn(pool: Pool) -> Conn:
    """A connection of `pool` over a FakeTransport, as the pool would have it after connecting."""
    conn = Conn(pool)
    conn.connection_made(FakeTransport())
    pool.busy.add(conn)
    return conn


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def _exchange(pieces: list[bytes], method: str = "GET", attach_early: bool = True):
    """Feed response bytes in the given pieces; returns (exchange, body seen by the sink, pool, conn)."""
    pool = Pool("http://127.0.0.1:1", 1.0, 5.0)
    conn = _conn(pool)
    ex = conn.send(method, b"GET / HTTP/1.1\r\n\r\n")
    seen: list[bytes] = []
    if attach_early:
        ex.attach(lambda data, now: seen.append(data))
    for p in pieces:
        conn.data_received(p)
    return ex, b"".join(seen), pool, conn


def test_chunked_response_split_at_every_byte():
    for cut in range(1, len(CHUNKED)):
        ex, body, pool, conn = _run(_exchange([CHUNKED[:cut], CHUNKED[cut:]]))
        assert ex.head.done() and ex.head.exception() is None and ex.status == 200 and ex.complete, cut
        assert body == BODY, cut
        assert [line for line in ex.lines if line.startswith("Set-Cookie")] == ["Set-Cookie: a=1", "Set-Cookie: b=2"]
        assert ex.low == {"content-type": "text/event-stream", "transfer-encoding": "chunked"}  # (what is read)
        assert not any(line.startswith("Transfer-Encoding") for line in ex.lines)
        assert pool.idle == [conn]  # keep-alive: back in the pool


def test_chunked_byte_by_byte_and_body_before_sink():
    ex, body, _, _ = _run(_exchange([bytes([b]) for b in CHUNKED]))
    assert body == BODY and ex.complete
    ex, body, _, _ = _run(_exchange([CHUNKED], attach_early=False))
    assert body == b"" and b"".join(d for d, _ in ex.pending) == BODY  # kept for the whole-body path


def test_content_length_interim_and_bodyless():
    head = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    ex, body, pool, conn = _run(_exchange([head + b"hel", b"lo"]))
    assert (ex.status, body, ex.complete, pool.idle) == (200, b"hello", True, [conn])
    ex, body, pool, conn = _run(_exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"]))
    assert body == b"ok" and pool.idle == [] and conn.transport.closed  # bytes beyond the body
    ex, body, _, _ = _run(_exchange([b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"]))
    assert ex.complete and body == b""
    ex, body, _, _ = _run(_exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"], method="HEAD"))
    assert ex.complete and body == b""


def test_close_delimited_and_connection_close():
    async def run():
        ex, body, pool, conn = await _exchange([b"HTTP/1.0 200 OK\r\n\r\nsome", b" body"])
        assert not ex.complete
        conn.connection_lost(None)
        return ex, body, pool
    ex, body, pool = _run(run())
    assert ex.complete and body == b"some body" and pool.idle == []
    ex, _, pool, conn = _run(_exchange([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"]))
    assert ex.complete and pool.idle == [] and conn.transport.closed


def test_broken_responses():
    async def cut_mid_body():
        ex, _, _, conn = await _exchange([CHUNKED[:120]])
        conn.connection_lost(ConnectionResetError())
        with pytest.raises(UpstreamError):
            await ex.done

    async def cut_mid_head():
        pool = Pool("http://127.0.0.1:1", 1.0, 5.0)
        conn = _conn(pool)
        ex = conn.send("GET", b"x")
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-")
        conn.timed_out = True
        conn.connection_lost(None)
        with pytest.raises(UpstreamTimeout):
            await ex.head

    async def bad_chunk_size():
        # not hex, and what int(x, 16) would take but a chunk size is not: a 0x prefix, a sign, an underscore
        for size in (b"zz", b"0x3", b"+3", b"0_3", b" 3"):
            for pieces in ([size + b"\r\nabc\r\n"], [size + b"\r\nab", b"c\r\n"]):  # whole chunk, or not
                ex, seen, _, conn = await _exchange([CHUNKED.split(b"\r\n\r\n")[0] + b"\r\n\r\n", *pieces])
                with pytest.raises(UpstreamError, match="chunked"):
                    await ex.done
                assert conn.transport.aborted and seen == b"", size

    async def bad_head():
        pool = Pool("http://127.0.0.1:1", 1.0, 5.0)
        conn = _conn(pool)
        ex = conn.send("GET", b"x")
        conn.data_received(b"SPDY/9 what\r\n\r\n")
        with pytest.raises(UpstreamError, match="status line"):
            await ex.head

    for case in (cut_mid_body, cut_mid_head, bad_chunk_size, bad_head):
        _run(case())


def test_client_gone_aborts_upstream():
    async def run():
        pool = Pool("http://127.0.0.1:1", 1.0, 5.0)
        conn = _conn(pool)
        ex = conn.send("GET", b"x")

        def sink(data, now):
            raise ClientGone
        ex.attach(sink)
        conn.data_received(CHUNKED[:140])
        with pytest.raises(ClientGone):
            await ex.done
        return conn
    assert _run(run()).transport.aborted


def test_request_bytes():
    pool = Pool("https://api.example.com", 1.0, 5.0)
    wire = pool.request_bytes("POST", "/v1/chat/completions?x=1", [(b"Authorization", b"Bearer k")], b"{}")
    assert wire == (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer k"
                    b"\r\nContent-Length: 2\r\n\r\n{}")
    assert Pool("http://127.0.0.1:8080/v1", 1, 1).host_header == "127.0.0.1:8080"
    assert Pool("http://[::1]:81", 1, 1).host_header == "[::1]:81"


def test_stale_idle_connection_is_retried_once():
    """The server answers one request per connection and then drops the connection when the next
    request arrives: the pooled connection fails before any byte, and a fresh one is used."""
    async def run():
        served = []

        async def handle(reader, writer):
            first = True
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not first:
                    writer.close()  # like a server that timed the idle connection out
                    return
                first = False
                served.append(head.split(b" ")[1])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Pool(f"http://127.0.0.1:{port}", 2.0, 5.0)
        try:
            for path in (b"/a", b"/b", b"/c"):
                ex = await pool.send("GET", pool.request_bytes("GET", path.decode(), [], b""))
                await ex.done
                assert ex.status == 200 and b"".join(d for d, _ in ex.pending) == b"ok"
        finally:
            await pool.close()
            server.close()
            await server.wait_closed()
        return served
    assert _run(run()) == [b"/a", b"/b", b"/c"]


def test_unreachable_and_timeout():
    async def run():
        server = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Pool(f"http://127.0.0.1:{port}", 2.0, 0.2)
        try:
            with pytest.raises(UpstreamTimeout):
                await pool.send("GET", pool.request_bytes("GET", "/", [], b""))
        finally:
            await pool.close()
            server.close()
        dead = Pool(f"http://127.0.0.1:{port}", 2.0, 0.2)  # the server is gone now
        with pytest.raises(UpstreamError, match="connect failed"):
            await dead.send("GET", b"GET / HTTP/1.1\r\n\r\n")
        await dead.close()
    _run(run())


def test_body_held_until_a_sink_attaches():
    """A big body arriving before the proxy attached its sink stops the reads instead of piling up."""
    async def run():
        pool = Pool("http://127.0.0.1:1", 1.0, 5.0)
        conn = _conn(pool)
        ex = conn.send("GET", b"x")
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 600000\r\n\r\n" + b"a" * 300_000)
        held = conn.transport.paused
        seen = []
        ex.attach(lambda data, now: seen.append(len(data)))
        conn.data_received(b"a" * 300_000)
        return held, conn.transport.paused, sum(seen), ex.complete
    assert _run(run()) == (True, False, 600_000, True)


def test_abort_after_completion_leaves_the_pooled_connection_alone():
    async def run():
        ex, _, pool, conn = await _exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
        next_ex = conn.send("GET", b"y")  # the connection already serves the next request
        ex.abort()
        return conn.transport.aborted, next_ex.head.done()
    assert _run(run()) == (False, False)


def test_client_gone_while_flushing_what_arrived_early():
    async def run():
        ex, _, _, conn = await _exchange([CHUNKED[:140]], attach_early=False)

        def sink(data, now):
            raise ClientGone
        ex.attach(sink)
        with pytest.raises(ClientGone):
            await ex.done
        return conn.transport.aborted
    assert _run(run())
