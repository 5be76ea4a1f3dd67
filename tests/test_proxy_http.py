"""HTTP/1.1 conformance of the metering proxy's client-facing side, black box, over raw sockets.

What a client sees on the wire: keep-alive and pipelining, who closes the connection and when, request
bodies in either framing, requests that are malformed or smuggle a second one (answered 4xx, nothing sent
upstream), and how each kind of upstream response is framed for the client (RFC 9112). These pin down the
behaviour the server side must keep whatever parses the requests; the framing of every response is read
by the parser here, so a body that leaks into the next response fails the test.

Every peer is on 127.0.0.1 and every socket has a timeout of a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field

import pytest

from tests.test_proxy import MODEL, loop_thread, proxy_factory, upstream  # noqa: F401 (fixtures)
from tests.test_proxy_hostile import raw_upstream  # noqa: F401 (fixture)

TIMEOUT_S = 3.0


# ---------------------------------------------------------------- a client that reads responses by their framing

@dataclass
class Resp:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    framing: str  # "length", "chunked", "close" (read to EOF) or "none" (HEAD, 1xx, 204, 304)
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)


class Client:
    """One raw client connection to the proxy; `response()` reads exactly one response off it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed with {self.buf[:200]!r} unread")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _fields(self) -> list[tuple[str, str]]:
        out = []
        while line := self._line():
            name, colon, value = line.partition(b":")
            assert colon and name == name.strip(), f"malformed field line {line!r}"
            out.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        return out

    def response(self, head: bool = False) -> Resp:
        """The next final response (1xx skipped); `head`: it answers a HEAD request."""
        while True:
            version, status, _ = self._line().split(b" ", 2)
            headers = self._fields()
            if not 100 <= int(status) < 200:
                break
        resp = Resp(version.decode(), int(status), headers, b"", "none")
        te = (resp.get("Transfer-Encoding") or "").lower()
        if head or resp.status in (204, 304):
            return resp
        if te:
            assert te == "chunked", f"unexpected transfer coding {te!r}"
            assert resp.get("Content-Length") is None  # RFC 9112 6.2: never both
            parts = []
            while size := int(self._line().split(b";")[0], 16):
                parts.append(self._exact(size))
                assert self._exact(2) == b"\r\n"
            resp.body, resp.framing, resp.trailers = b"".join(parts), "chunked", self._fields()
        elif (length := resp.get("Content-Length")) is not None:
            assert len(set(resp.all("Content-Length"))) == 1
            resp.body, resp.framing = self._exact(int(length)), "length"
        else:
            resp.body, resp.framing = self.rest(), "close"
        return resp

    def rest(self) -> bytes:
        """Everything until the proxy closes the connection (socket.timeout if it does not)."""
        while chunk := self.sock.recv(65536):
            self.buf += chunk
        data, self.buf = self.buf, b""
        return data

    def closed(self) -> bool:
        """The proxy closed the connection and sent nothing more."""
        return self.rest() == b""


def _get(path: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: proxy\r\n{extra}\r\n".encode()


def _request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: proxy\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


CHAT = json.dumps({"model": MODEL, "messages": []}).encode()


def _chat(mode: str = "json", extra: str = "") -> bytes:
    return _request("POST", "/v1/chat/completions", CHAT, f"Content-Type: application/json\r\nx-test-mode: {mode}\r\n"
                    + extra)


# ---------------------------------------------------------------- an upstream that records requests and answers scripted bytes

@dataclass
class Scripted:
    url: str
    seen: list[tuple[bytes, bytes]]  # (head, body) of each request received

    @property
    def paths(self) -> list[bytes]:
        return [head.split(b" ")[1] for head, _ in self.seen]


@pytest.fixture
def scripted(raw_upstream):  # noqa: F811
    """Factory: scripted(reply) -> Scripted. For each request, reply(head) gives the bytes to send (a list:
    sent piece by piece, 10 ms apart); then the connection is closed."""

    def start(reply) -> Scripted:
        seen: list[tuple[bytes, bytes]] = []

        async def respond(reader, writer):
            out = reply(seen[-1][0])
            for i, piece in enumerate(out if isinstance(out, list) else [out]):
                if i:
                    await asyncio.sleep(0.01)
                writer.write(piece)
                await writer.drain()

        return Scripted(raw_upstream(respond, seen), seen)

    return start


def _ok(body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _chunked(pieces: list[bytes], extra: str = "") -> list[bytes]:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n{extra}Transfer-Encoding: chunked\r\n\r\n".encode()
    return [head] + [b"%x\r\n%b\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


# ---------------------------------------------------------------- 1: keep-alive

def test_sequential_requests_share_one_connection(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        for name in ("one", "two", "three"):
            c.send(_get(f"/echo/{name}"))
            r = c.response()
            assert r.status == 200 and r.json()["path"] == f"/echo/{name}"
            assert (r.get("Connection") or "").lower() != "close"
        c.send(_request("PUT", "/echo/four", b"x" * 10))
        r = c.response()
        assert r.status == 200 and r.json()["len"] == 10 and r.json()["method"] == "PUT"
    assert p.total() == 0  # none of these is a model call


def test_metered_post_then_get_on_one_connection(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        c.send(_chat("json"))
        r = c.response()
        assert r.status == 200 and r.json()["choices"][0]["message"]["content"] == "hi"
        c.send(_chat("stream"))  # chunked, or with a length when it came whole: its framing must end it exactly
        r = c.response()
        assert r.status == 200 and r.framing in ("chunked", "length") and r.body.endswith(b"data: [DONE]\n\n")
        c.send(_get("/echo/after"))
        r = c.response()
        assert r.status == 200 and r.json()["path"] == "/echo/after"
    assert p.settle(2) == 2 and p.count(200) == 2


# ---------------------------------------------------------------- 2: pipelining

def test_pipelined_requests_answered_in_order(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        c.send(_get("/echo/one") + _request("POST", "/echo/two", b"12345") + _chat("stream") + _get("/echo/three"))
        first, second, chat, third = c.response(), c.response(), c.response(), c.response()
        assert first.json()["path"] == "/echo/one" and first.json()["len"] == 0
        assert second.json()["path"] == "/echo/two" and second.json()["len"] == 5
        assert chat.status == 200 and chat.body.endswith(b"data: [DONE]\n\n")
        assert third.json()["path"] == "/echo/three"
        c.send(_get("/echo/four"))  # and the connection is still in step
        assert c.response().json()["path"] == "/echo/four"
    assert p.settle(1) == 1 and p.count(200) == 1


# ---------------------------------------------------------------- 3: who closes the connection

def test_connection_close_from_client_closes_after_the_response(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        c.send(_get("/echo/last", "Connection: close\r\n"))
        r = c.response()
        assert r.status == 200 and r.json()["path"] == "/echo/last"
        assert (r.get("Connection") or "").lower() == "close"  # RFC 9112 9.6: says it will close
        assert c.closed()


def test_garbage_pipelined_after_a_request_is_answered_400_after_it(scripted, proxy_factory):  # noqa: F811
    """The valid request in flight is answered first; the 400 for what follows it comes after, then the close."""
    up = scripted(lambda head: [_ok(), b""])  # the answer comes 10 ms later: the garbage is parsed meanwhile
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        c.send(_get("/first") + b"GET /x HTTP/1.1\r\nHost: proxy\r\nNot a header\r\n\r\n")
        first, second = c.response(), c.response()
        assert c.closed()
    assert (first.status, first.body, second.status) == (200, b"{}", 400)
    assert up.paths == [b"/first"]


@pytest.mark.parametrize("version", ["2.0", "0.9", "1.2"])
def test_http_versions_other_than_1x_are_refused(scripted, proxy_factory, version):  # noqa: F811
    up = scripted(lambda head: _ok())
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        c.send(_get("/v", version=version))
        try:
            r = c.response()
        except EOFError:  # refused by the parser itself, without an answer: also fine
            r = None
        assert r is None or r.status in (400, 505)
        assert c.closed()
    assert up.paths == []


def test_request_pipelined_after_connection_close_is_discarded(scripted, proxy_factory):  # noqa: F811
    """RFC 9112 9.6: the request carrying `close` is answered, then the connection closed; what follows
    it is dropped (not a 400 for the whole connection, which would lose the valid first request)."""
    up = scripted(lambda head: _ok())
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        c.send(_get("/last", "Connection: close\r\n") + _get("/ignored"))
        r = c.response()
        assert c.closed()
    assert r.status == 200 and r.body == b"{}"
    assert up.paths == [b"/last"]  # the pipelined one was never sent


def test_http10_request_without_keep_alive_is_answered_then_closed(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        c.send(b"POST /echo/ten HTTP/1.0\r\nHost: proxy\r\nContent-Length: 7\r\n\r\nabcdefg")
        r = c.response()
        assert r.status == 200 and r.framing in ("length", "close")  # never chunked to HTTP/1.0
        seen = r.json()
        assert seen["path"] == "/echo/ten" and seen["len"] == 7 and seen["method"] == "POST"
        assert c.closed()
    with Client(p.server.port) as c:
        c.send(_get("/echo/bare", version="1.0"))
        r = c.response()
        assert r.status == 200 and r.json()["path"] == "/echo/bare"
        assert c.closed()


def test_http10_keep_alive_is_honoured_with_a_length(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        for name in ("a", "b"):
            c.send(_get(f"/echo/{name}", "Connection: keep-alive\r\n", version="1.0"))
            r = c.response()
            assert r.framing == "length" and r.json()["path"] == f"/echo/{name}"


# ---------------------------------------------------------------- 4: a chunked request body

def test_chunked_request_body_is_forwarded_dechunked(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        c.send(b"POST /echo/chunked HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"5\r\nhello\r\n", b"6\r", b"\n world\r\n", b"1a;ext=1\r\n" + b"z" * 26 + b"\r\n", b"0\r\n\r\n"):
            time.sleep(0.02)
            c.send(piece)
        r = c.response()
        seen = r.json()
        assert r.status == 200 and seen["len"] == 5 + 6 + 26
        headers = {k.lower(): v for k, v in seen["headers"]}
        assert headers["content-length"] == "37" and "transfer-encoding" not in headers
        c.send(_get("/echo/next"))  # the body's end was found exactly
        assert c.response().json()["path"] == "/echo/next"


def test_chunked_request_body_with_trailers(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        c.send(b"POST /echo/t HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\nX-Trailer: late\r\n\r\n" + _get("/echo/next"))
        r = c.response()
        assert r.status == 200 and r.json()["len"] == 3
        assert "x-trailer" not in {k.lower() for k, _ in r.json()["headers"]}  # trailers are not headers
        assert c.response().json()["path"] == "/echo/next"


def test_chunked_metered_call_is_metered(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    half = len(CHAT) // 2
    with Client(p.server.port) as c:
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
               b"x-test-mode: json\r\nTransfer-Encoding: chunked\r\n\r\n")
        c.send(b"%x\r\n%b\r\n" % (half, CHAT[:half]))
        time.sleep(0.02)
        c.send(b"%x\r\n%b\r\n0\r\n\r\n" % (len(CHAT) - half, CHAT[half:]))
        r = c.response()
        assert r.status == 200 and r.json()["usage"]["prompt_tokens"] == 5
    assert p.settle(1) == 1 and p.count(200) == 1  # the model came from the de-chunked body


# ---------------------------------------------------------------- 5: malformed framing and smuggling

SMUGGLED = "GET /echo/smuggled HTTP/1.1\r\nHost: proxy\r\n\r\n"
TAIL = "0\r\n\r\n" + SMUGGLED

MALFORMED = {
    "cl_and_te": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: {len(TAIL)}\r\n"
                 f"Transfer-Encoding: chunked\r\n\r\n{TAIL}",
    "te_and_cl": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 f"Content-Length: 5\r\n\r\n{TAIL}",
    "two_content_lengths": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: {len(SMUGGLED) + 5}"
                           f"\r\n\r\nhello{SMUGGLED}",
    "content_length_list": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, {len(SMUGGLED) + 5}\r\n\r\n"
                           f"hello{SMUGGLED}",
    "content_length_sign": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello{SMUGGLED}",
    "content_length_negative": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{SMUGGLED}",
    "space_before_colon": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello{SMUGGLED}",
    "bad_chunk_size": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n{TAIL}",
    "chunk_size_overflow": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           f"1{'0' * 20}\r\nhello\r\n{TAIL}",
    "chunk_without_crlf": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          f"5\r\nhelloXX0\r\n\r\n{SMUGGLED}",
    "te_not_chunked": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{TAIL}",
    "te_chunked_not_last": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n{TAIL}",
    "te_obfuscated": f"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n{TAIL}",
    "obs_fold": f"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n{SMUGGLED}",
    "bad_version": f"GET /echo/a HTTP/1.x\r\nHost: x\r\n\r\n{SMUGGLED}",
    "bad_protocol": f"GET /echo/a FOO/1.1\r\nHost: x\r\n\r\n{SMUGGLED}",
    "nul_in_header": f"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n{SMUGGLED}",
    "bare_cr_in_header": f"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-Cr: a\rb\r\n\r\n{SMUGGLED}",
    "nul_in_target": f"GET /echo/a\x00b HTTP/1.1\r\nHost: x\r\n\r\n{SMUGGLED}",
    "space_in_target": f"GET /echo/a b HTTP/1.1\r\nHost: x\r\n\r\n{SMUGGLED}",
    "space_in_header_name": f"GET /echo/a HTTP/1.1\r\nHost: x\r\nX Bad: 1\r\n\r\n{SMUGGLED}",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_request_is_refused_and_nothing_goes_upstream(scripted, proxy_factory, name):  # noqa: F811
    up = scripted(lambda head: _ok())
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        c.send(MALFORMED[name].encode("latin-1"))
        try:
            r = c.response()
        except EOFError:  # closed without an answer: also a refusal
            r = None
        if r is not None:
            assert 400 <= r.status < 500, r
            assert c.closed()  # the framing cannot be trusted: the connection ends with the answer
    assert up.seen == []  # neither the request nor what it smuggled reached the upstream
    assert p.total() == 0
    with Client(p.server.port) as c:  # and the proxy goes on serving
        c.send(_get("/echo/fine"))
        assert c.response().status == 200
    assert up.paths == [b"/echo/fine"]


@pytest.mark.parametrize("head", [
    pytest.param("GET /echo/a HTTP/1.1\r\n\r\n", id="no_host"),
    pytest.param("GET /echo/a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", id="two_hosts"),
])
def test_request_without_exactly_one_host_is_400(scripted, proxy_factory, head):  # noqa: F811
    up = scripted(lambda head: _ok())
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        c.send(head.encode())
        assert c.response().status == 400  # RFC 9112 3.2
        assert c.closed()
    assert up.seen == []


# ---------------------------------------------------------------- 6, 7: responses without a body

def test_head_request_gets_the_length_and_no_body(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    head = b"HEAD /echo/h HTTP/1.1\r\nHost: proxy\r\n\r\n"
    with Client(int(upstream.rsplit(":", 1)[1])) as direct:  # the same request as the proxy sends it
        direct.send(head.replace(b"proxy", upstream.removeprefix("http://").encode()))
        length = direct.response(head=True).get("Content-Length")
    with Client(p.server.port) as c:
        c.send(head)
        r = c.response(head=True)
        assert r.status == 200 and length and r.get("Content-Length") == length  # the upstream's, unchanged
        assert r.get("Transfer-Encoding") is None
        c.send(_get("/echo/after"))  # a body after the HEAD response would be read as this response's head
        assert c.response().json()["path"] == "/echo/after"


def test_head_request_relays_a_length_without_a_body(scripted, proxy_factory):  # noqa: F811
    up = scripted(lambda head: b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12345\r\n\r\n")
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        for _ in range(2):
            c.send(b"HEAD /big HTTP/1.1\r\nHost: proxy\r\n\r\n")
            r = c.response(head=True)
            assert r.status == 200 and r.get("Content-Length") == "12345"
        c.sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            c.rest()  # not a byte of body
        assert c.buf == b""
    assert [head.split(b" ")[0] for head, _ in up.seen] == [b"HEAD", b"HEAD"]


NO_BODY = {
    b"/204": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    b"/304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nX-A: 1\r\n\r\n',
    b"/304-length": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nX-A: 1\r\nContent-Length: 42\r\n\r\n',
}


@pytest.mark.parametrize("path", list(NO_BODY))
def test_204_and_304_are_relayed_without_a_body(scripted, proxy_factory, path):  # noqa: F811
    up = scripted(lambda head: NO_BODY.get(head.split(b" ")[1], _ok()))
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        c.send(_get(path.decode()))
        r = c.response()
        assert r.status == int(path[1:4]) and r.get("X-A") == "1"
        assert r.get("Transfer-Encoding") is None
        if r.status == 204:
            assert r.get("Content-Length") is None  # RFC 9110 8.6: never in a 204
        c.send(_get("/echo/after"))  # a stray body or chunk would be read as this response's head
        r = c.response()
        assert r.status == 200 and r.body == b"{}"


# ---------------------------------------------------------------- 8: response framing

def test_upstream_length_is_relayed_not_rechunked(scripted, proxy_factory):  # noqa: F811
    big = bytes(range(256)) * 800  # 200 KiB, sent in pieces: relayed as it arrives
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(big)}\r\n\r\n"
    replies = {b"/small": _ok(b'{"a": 1}'), b"/big": [head.encode()] + [big[i:i + 50_000] for i in range(0, len(big), 50_000)]}
    up = scripted(lambda h: replies[h.split(b" ")[1]])
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        for path, body in ((b"/small", b'{"a": 1}'), (b"/big", big), (b"/small", b'{"a": 1}')):
            c.send(_get(path.decode()))
            r = c.response()
            assert r.framing == "length" and r.get("Content-Length") == str(len(body)) and r.body == body


def test_upstream_chunked_is_relayed_chunked_to_http11(scripted, proxy_factory):  # noqa: F811
    pieces = [b"first ", b"second ", b"x" * 70_000, b"last"]
    replies = {b"/once": b"".join(_chunked(pieces)), b"/pieces": _chunked(pieces)}
    up = scripted(lambda h: replies[h.split(b" ")[1]])
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        for path in ("/pieces", "/once", "/pieces"):
            c.send(_get(path))
            r = c.response()
            assert r.status == 200 and r.body == b"".join(pieces)
            # a body still arriving is relayed chunked; one that came whole with its head may go with its length
            assert r.framing == "chunked" if path == "/pieces" else r.framing in ("chunked", "length")


def test_whole_upstream_chunks_go_to_the_client_as_they_came_and_are_metered(scripted, proxy_factory):  # noqa: F811
    """A read that is one whole chunk is written on with the upstream's own framing (upper-case hex,
    leading zeros: valid as they are); the client reads the body intact and the call is metered."""
    events = [b'data: {"id": "c1", "choices": [{"delta": {"content": "Hel"}}]}\n\n',
              b'data: {"choices": [{"delta": {"content": "lo"}}]}\n\n',
              b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n', b"data: [DONE]\n\n"]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    framed = [b"%04X\r\n%b\r\n" % (len(e), e) for e in events]
    up = scripted(lambda h: [head, *framed, b"0\r\n\r\n"])
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        c.send(_chat("stream"))
        r = c.response()
    assert r.status == 200 and r.framing == "chunked" and r.body == b"".join(events)
    assert p.settle(1) == 1 and p.count(200) == 1
    rec = p.metrics.records[0]
    assert (rec.ok, rec.text_chunks, rec.input_tokens, rec.output_tokens, rec.request_id) == (True, 2, 4, 2, "c1")


def test_upstream_chunked_is_not_chunked_to_http10(scripted, proxy_factory):  # noqa: F811
    pieces = [b"alpha ", b"beta ", b"gamma"]
    up = scripted(lambda h: _chunked(pieces))
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        c.send(_get("/x", version="1.0"))
        r = c.response()
        assert r.status == 200 and r.framing == "close" and r.body == b"".join(pieces)  # RFC 9112 7: no chunked
        assert c.closed()


def test_upstream_close_delimited_is_chunked_to_http11_and_keeps_the_connection(scripted, proxy_factory):  # noqa: F811
    replies = {b"/close": [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n", b"part one, ",
                           b"part two"],
               b"/ok": _ok()}
    up = scripted(lambda h: replies[h.split(b" ")[1]])
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        c.send(_get("/close"))
        r = c.response()
        assert r.framing == "chunked" and r.body == b"part one, part two"
        assert (r.get("Connection") or "").lower() != "close"  # the upstream's Connection is hop-by-hop
        c.send(_get("/ok"))
        assert c.response().body == b"{}"


# ---------------------------------------------------------------- 9: a huge request head

@pytest.mark.parametrize("shape", [
    "one_field",
    "many_fields",  # the head as a whole is bounded (64 KiB), not only each line
    "long_target",
])
def test_huge_request_head_is_refused_and_not_metered(scripted, proxy_factory, shape):  # noqa: F811
    up = scripted(lambda head: _ok())
    p = proxy_factory(up.url)
    if shape == "one_field":
        extra, target = "X-Big: " + "a" * 100_000 + "\r\n", "/v1/chat/completions"
    elif shape == "many_fields":
        extra, target = "".join(f"X-F{i}: {'a' * 8000}\r\n" for i in range(13)), "/v1/chat/completions"
    else:
        extra, target = "", "/v1/chat/completions?" + "q" * 100_000
    with Client(p.server.port) as c:
        try:
            c.send(f"POST {target} HTTP/1.1\r\nHost: proxy\r\nContent-Length: {len(CHAT)}\r\n{extra}\r\n".encode()
                   + CHAT)
            r = c.response()
        except (EOFError, ConnectionError):  # closed (or reset while still sending): a refusal too
            r = None
        assert r is None or 400 <= r.status < 500
    assert p.count(200) == 0 and up.seen == []


# ---------------------------------------------------------------- 10: the target goes upstream byte for byte

TARGETS = [
    "/echo/a%2Fb%20c/%7e%7E?x=1&y=%2F&z=a+b&empty=&flag",
    "/echo/%00%ff%C3%A9?q=%00",
    "/echo/a/./b/../c//d;p=1?&&=&",
    "/echo/?a=b?c=d/e",
    "/echo/x?q=" + "%41" * 500,
    "/echo/semi;colon:at@bang!dollar$amp&quote'paren()star*plus+comma,eq=tilde~",
]


@pytest.mark.parametrize("target", TARGETS)
def test_target_is_forwarded_byte_for_byte(upstream, proxy_factory, target):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        c.send(_get(target))
        r = c.response()
        assert r.status == 200 and r.json()["path"] == target


# ---------------------------------------------------------------- 11: a head trickled in byte by byte

def test_head_arriving_one_byte_per_send(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = _request("POST", "/echo/slow?x=1", b"body!", "X-Trickle: yes\r\n")
        for i in range(len(data)):
            c.send(data[i:i + 1])
            time.sleep(0.004)
        r = c.response()
        seen = r.json()
        assert r.status == 200 and seen["path"] == "/echo/slow?x=1" and seen["len"] == 5
        assert ["X-Trickle", "yes"] in seen["headers"]


# ---------------------------------------------------------------- 12: non-ASCII response field values

def test_non_ascii_response_field_value(scripted, proxy_factory):  # noqa: F811
    value = "café ✓".encode()
    up = scripted(lambda head: _ok(extra=b"X-Name: " + value + b"\r\n"))
    p = proxy_factory(up.url)
    with Client(p.server.port) as c:
        c.send(_get("/x"))
        r = c.response()
        assert r.status == 200, r
        assert r.get("X-Name").encode("latin-1") == value  # relayed as the same bytes


# ---------------------------------------------------------------- 13: upgrades are not proxied

def test_upgrade_request_is_forwarded_as_a_plain_request(upstream, proxy_factory):  # noqa: F811
    p = proxy_factory(upstream)
    with Client(p.server.port) as c:
        c.send(_get("/echo/ws", "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"))
        r = c.response()
        assert r.status == 200 and r.json()["path"] == "/echo/ws"
        headers = {k.lower(): v for k, v in r.json()["headers"]}
        assert "upgrade" not in headers and "connection" not in headers
        assert headers["sec-websocket-key"] == "dGhlIHNhbXBsZSBub25jZQ=="  # end to end: passed on
        assert r.get("Upgrade") is None
        c.send(_get("/echo/after"))  # RFC 9110 7.8: the Upgrade was ignored, so the connection stays HTTP/1.1
        assert c.response().json()["path"] == "/echo/after"


def test_a_handler_that_fails_closes_its_connection_with_one_line_and_no_traceback(loop_thread, caplog):  # noqa: F811
    """A bug in the handler (not a peer's doing) must not take the listener down or log what was sent."""
    import logging

    from opskit.sidecar.http_guard import Limits
    from opskit.sidecar.proxy_http import Server

    calls = []

    async def handler(req):
        calls.append(req.target)
        if req.target == "/boom":
            raise KeyError("secret-value-from-the-request")
        req.conn.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True

    log = logging.getLogger("opskit.test.proxy_http")
    caplog.set_level(logging.DEBUG, logger=log.name)

    async def start():
        server = Server(handler, Limits(), log, "proxy")
        return server, await server.start("127.0.0.1", 0)

    server, port = loop_thread.run(start())
    try:
        with Client(port) as c:
            c.send(_get("/boom"))
            assert c.closed()  # nothing half-written is left for the client to misread
        with Client(port) as c:  # the listener still serves
            c.send(_get("/fine"))
            assert c.response().status == 204
        lines = [r for r in caplog.records if r.name == log.name]
        assert len(lines) == 1 and lines[0].exc_info is None
        assert "KeyError" in lines[0].getMessage() and "secret-value" not in lines[0].getMessage()
        assert calls == ["/boom", "/fine"]
    finally:
        loop_thread.run(server.close())
