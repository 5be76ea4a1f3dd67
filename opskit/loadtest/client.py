"""The load-test HTTP client: one chat completion, timed at perf_counter precision, as a log row.

It runs inside Locust processes (gevent), on geventhttpclient's connection pool (the client behind
Locust's FastHttpUser) and, for the mock's WebSocket transport, on websocket-client. It does not import
locust, so Locust only sees what `users` reports to it.

Streams are read as they arrive and fed to opskit.core.sse's incremental parser; each event is stamped
with the kernel's receive time of the read that brought it (opskit.loadtest.stamped: a late wake-up of
this process adds nothing to TTFT or ITL), as a perf_counter reading. All times are measured from
`t_sched`: the scheduled send time for open-loop load, the send time otherwise.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import gevent
import gevent.monkey
from geventhttpclient import HTTPClient

from opskit.core import records
from opskit.core.auth import AuthError
from opskit.core.llm_json import completion_usage
from opskit.core.sse import SSEParser
from opskit.core.stream_meter import StreamMeter
from opskit.loadtest.stamped import body_reads

perf = time.perf_counter
GROUND_TRUTH = (("x-mock-ttft-ms", "mock_ttft_ms", float), ("x-mock-queue-ms", "mock_queue_ms", float),
                ("x-mock-output-tokens", "mock_output_tokens", int))

PROXY_ERROR_TYPE = "x-opskit-error-type"   # opskit.sidecar.proxy.ERROR_TYPE_HEADER
AuthFn = Callable[[str, str, bytes], dict]


_select_now = gevent.monkey.get_original("select", "select")  # the OS's select, even in Locust's patched world


def _alive(sock) -> bool:
    """geventhttpclient's check of a pooled connection before reuse, without its yield: it polls with
    gevent's select(), which also runs every other ready greenlet first, so a request waited behind
    them after its send time was taken. Readable while idle means closed (or garbage): not reused."""
    try:
        fd = sock.fileno()
        return fd >= 0 and not _select_now([fd], [], [], 0)[0]
    except (OSError, ValueError):
        return False


def _no_auth(method: str, path: str, body: bytes) -> dict:
    return {}


def auth_for(p) -> tuple[AuthFn | None, Callable[[], dict] | None]:
    """Header function and WebSocket auth message for the target of RunParams `p` (secrets stay in
    this process); (None, None) for the embedded mock or a target without auth."""
    if not (p.config_path or p.target_url):
        return None, None
    from opskit.core import config

    target = config.load(p.config_path, p.target_url).target(p.target_name)
    if target.auth.scheme == "none":
        return None, None
    from opskit.core.auth import Authenticator

    authenticator = Authenticator(target.auth)
    # a fresh WebSocket auth message per connection: HMAC timestamps and OAuth2 tokens age
    return authenticator.headers, getattr(authenticator, "ws_auth_message", None)


def _discard(resp) -> None:
    """Close a connection whose body was not read to the end, so the pool never reuses it."""
    pool, sock = getattr(resp, "_pool", None), getattr(resp, "_sock", None)
    if pool is not None and sock is not None:
        pool.release_socket(sock)
        resp._sock = resp._pool = None


def _gaps(meter: StreamMeter) -> list[float]:
    """Inter-token gaps: each gap between text chunks divided by the tokens of the later chunk.

    Per-chunk token counts are not on the wire; with `usage` the average tokens per text chunk is
    used (exact when the server sends a fixed number per chunk), else one token per chunk.
    """
    gaps = meter.gaps or []
    _, out, from_usage = meter.tokens
    per_chunk = out / meter.text_chunks if from_usage and meter.text_chunks and out else 1.0
    return [round(g / per_chunk, 7) for g in gaps]


class ChatClient:
    """Sends chat completions to one base URL. One per Locust process; safe across greenlets."""

    def __init__(self, base_url: str, path: str = "/v1/chat/completions", auth: AuthFn | None = None,
                 timeout_s: float = 60.0, pool_size: int = 100, ws_auth: Callable[[], dict] | None = None) -> None:
        url = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self.prefix = url.path.rstrip("/")
        self.path = path if path.startswith(self.prefix) or not self.prefix else self.prefix + path
        self.auth = auth or _no_auth
        self.ws_auth = ws_auth
        self.timeout_s = timeout_s
        # set when the target's token endpoint refused our credentials: no later request can succeed
        self.refused: str | None = None
        self.keep_error_body = False  # the canary sets it: a refused call's body goes into its row
        # no per-read network timeout (each would arm a timer per chunk): call() bounds the whole request
        self.http = HTTPClient.from_url(base_url, concurrency=pool_size, connection_timeout=min(10.0, timeout_s),
                                        network_timeout=None)
        pool = getattr(self.http, "_connection_pool", None)
        if callable(getattr(pool, "_is_socket_alive", None)):
            pool._is_socket_alive = _alive

    def close(self) -> None:
        """Close every pooled connection."""
        self.http.close()

    def call(self, body: dict, t_sched: float | None = None, transport: str = "sse") -> dict:
        """Send one request and return its log row (timings, status, tokens, ground truth)."""
        if transport == "ws":
            return self._call_ws(body, t_sched)
        payload = json.dumps(body, separators=(",", ":")).encode()
        try:
            auth = self.auth("POST", self.path, payload)
        except AuthError as exc:
            return self._no_credentials(exc, t_sched, body)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if body.get("stream")
                   else "application/json", **auth}
        t_sent = perf()
        t0 = t_sent if t_sched is None else t_sched
        row = {"t_sched": t0, "t_sent": t_sent, "status": 0, "streamed": bool(body.get("stream")),
               "transport": "sse" if body.get("stream") else "json"}
        resp = None
        try:
            with gevent.Timeout(self.timeout_s):
                resp = self.http.request("POST", self.path, body=payload, headers=headers)
                row["status"] = resp.status_code
                self._headers(resp, row)
                ctype = resp.get("content-type") or ""
                if resp.status_code == 200 and ctype.startswith("text/event-stream"):
                    self._read_stream(resp, t0, row)
                else:
                    self._read_body(resp, t0, row)
        except gevent.Timeout:
            self._fail(row, records.TIMEOUT, "timeout", resp)
        except (OSError, ValueError, RuntimeError) as exc:
            kind = records.STREAM_BROKEN if row["status"] else records.CONNECTION
            self._fail(row, kind, exc.__class__.__name__, resp)
        return row

    def _no_credentials(self, exc: AuthError, t_sched: float | None, body: dict, transport: str | None = None) -> dict:
        """The row of a request never sent for want of credentials (a token fetch failed or was refused:
        it killed the request's greenlet with a traceback before). The message holds no secret."""
        if exc.refused:
            self.refused = str(exc)
        now = perf()
        t0 = now if t_sched is None else t_sched
        return {"t_sched": t0, "t_sent": None, "t_end": now, "duration_s": now - t0, "status": 0,
                "streamed": bool(body.get("stream")),
                "transport": transport or ("sse" if body.get("stream") else "json"),
                "error_type": records.CLIENT_ERROR, "error": f"no credentials: {exc}"[:160]}

    def _fail(self, row: dict, kind: str, reason: str, resp) -> None:
        row["t_end"] = perf()
        row["duration_s"] = row["t_end"] - row["t_sched"]
        row["error_type"], row["error"] = kind, reason
        if resp is not None:
            _discard(resp)

    @staticmethod
    def _headers(h, row: dict) -> None:
        for name, key, conv in GROUND_TRUTH:
            value = h.get(name)
            if value is not None:
                with contextlib.suppress(ValueError):
                    row[key] = conv(value)
        if row["status"] == 429 or h.get("x-ratelimit-limit-requests") is not None:
            row["retry_after"] = h.get("retry-after")
            row["rl_limit_requests"] = h.get("x-ratelimit-limit-requests")

    def _read_stream(self, resp, t0: float, row: dict) -> None:
        meter, parser = StreamMeter(t0, keep_gaps=True), SSEParser()
        nbytes = 0
        now = perf()
        on_data, feed = meter.on_data, parser.feed
        for data, now in body_reads(resp):
            nbytes += len(data)
            for payload in feed(data):
                on_data(payload, now)
        for payload in parser.close():
            meter.on_data(payload, now)
        self._stream_row(meter, now, nbytes, row)

    @staticmethod
    def _stream_row(meter: StreamMeter, t_end: float, nbytes: int, row: dict) -> None:
        inp, out, from_usage = meter.tokens
        cached, reasoning = meter.details
        row.update(t_end=t_end, duration_s=t_end - meter.t0, ttft_s=meter.ttft, ttfot_s=meter.ttfot,
                   itl=_gaps(meter), input_tokens=inp, output_tokens=out, tokens_from_usage=from_usage,
                   cached_input_tokens=cached, reasoning_tokens=reasoning,
                   text_chunks=meter.text_chunks, bytes=nbytes, error_type=records.OK)
        if meter.stream_error:
            row["error_type"], row["error"] = records.SERVER_ERROR, f"error in stream: {meter.stream_error}"[:80]
        elif meter.malformed:
            row["error_type"], row["error"] = records.STREAM_BROKEN, "malformed chunk"
        elif not meter.done:
            row["error_type"], row["error"] = records.STREAM_BROKEN, "stream ended without [DONE]"

    def _read_body(self, resp, t0: float, row: dict) -> None:
        data = resp.read()
        t_end = perf()
        row.update(t_end=t_end, duration_s=t_end - t0, bytes=len(data),
                   error_type=records.error_type_for_status(row["status"]))
        if row["status"] == 200:
            u = completion_usage(data)
            # DESIGN.md: a non-streamed request has a duration and no TTFT (the first token came with the last)
            row.update(input_tokens=u.input, output_tokens=u.output, tokens_from_usage=u.from_usage, ttft_s=None,
                       text_chunks=int(u.has_text), cached_input_tokens=u.cached, reasoning_tokens=u.reasoning)
        elif row["error_type"]:
            row["error"] = f"HTTP {row['status']}"
            # the metering proxy's own 502/504 names what went wrong upstream: count it as the exporter does
            kind = resp.get(PROXY_ERROR_TYPE)
            if kind in (records.CONNECTION, records.TIMEOUT):
                row["error_type"] = kind
            if self.keep_error_body:  # the canary explains a refusal from the body (bounded)
                row["error_body"] = data[:2000].decode("utf-8", "replace")

    def _call_ws(self, body: dict, t_sched: float | None) -> dict:
        """One request over the mock's WebSocket transport (GET /v1/chat/stream)."""
        import websocket  # websocket-client; gevent-patched sockets inside Locust

        url = urlsplit(self.base_url)
        path = self.prefix + ("/chat/stream" if self.prefix.endswith("/v1") else "/v1/chat/stream")
        ws_url = f"{'wss' if url.scheme == 'https' else 'ws'}://{url.netloc}{path}"
        t_sent = perf()
        t0 = t_sent if t_sched is None else t_sched
        row = {"t_sched": t0, "t_sent": t_sent, "status": 0, "streamed": True, "transport": "ws"}
        meter = StreamMeter(t0, keep_gaps=True)
        try:
            auth = self.ws_auth() if self.ws_auth else {"type": "auth"}
        except AuthError as exc:
            return self._no_credentials(exc, t_sched, body, "ws")
        ws = None
        try:
            with gevent.Timeout(self.timeout_s):
                ws = websocket.create_connection(ws_url, timeout=self.timeout_s)
                row["status"] = 101
                ws.send(json.dumps(auth))
                ws.send(json.dumps({"type": "request", "body": body}))
                self._ws_loop(ws, meter, row)
        except gevent.Timeout:
            self._fail(row, records.TIMEOUT, "timeout", None)
        except (OSError, ValueError, websocket.WebSocketException) as exc:
            self._fail(row, records.STREAM_BROKEN if row["status"] else records.CONNECTION,
                       exc.__class__.__name__, None)
        finally:
            if ws is not None:
                ws.close()
        return row

    def _ws_loop(self, ws, meter: StreamMeter, row: dict) -> None:
        nbytes, now = 0, perf()
        while True:
            raw = ws.recv()
            now = perf()
            nbytes += len(raw)
            msg = json.loads(raw)
            kind = msg.get("type")
            if kind == "chunk":
                meter.on_data(json.dumps(msg.get("data")), now)
            elif kind == "done":
                meter.done = True
                break
            else:
                err = msg.get("error") if isinstance(msg.get("error"), dict) else {}
                code = msg.get("status", err.get("status"))  # the HTTP status it stands for, when given
                row["status"] = code if isinstance(code, int) else 500
                row.update(t_end=now, duration_s=now - meter.t0, error=str(err.get("type") or "error")[:80],
                           error_type=records.error_type_for_status(row["status"]) or records.SERVER_ERROR)
                return
        row["status"] = 200
        self._stream_row(meter, now, nbytes, row)
