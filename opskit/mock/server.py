"""The mock's API listener: OpenAI/DeepSeek-shaped HTTP endpoints on aiohttp.

Routes: POST /v1/chat/completions (and /chat/completions), POST /v1/completions, GET /v1/models
(and /models), POST /oauth/token, GET /v1/chat/stream (WebSocket, see ws.py), GET /health and,
with --engine, the engine's own endpoints (/metrics, ...; engine_routes.py). Anything else is a
counted 404 (or 405 on a known path). Every response is counted by status and route in
`state.counters`, exactly once. Handlers are cancelled when their client goes away
(`handler_cancellation=True`), which ends hangs and queue waits and is counted as a client disconnect.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import parse_qsl

from aiohttp import HttpVersion11, web

from opskit.mock import engine, engine_routes, ws
from opskit.mock.auth import AuthError
from opskit.mock.engine import Refused, StreamCut
from opskit.mock.state import MockState
from opskit.mock.wire import BadRequest, dumps, error_body, parse_request

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
_HIGH_WATER = 256 * 1024   # bytes queued for one slow client before its stream waits
_JSON = "application/json"

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
TEXT_PATHS = ("/v1/completions", "/completions")
MODEL_PATHS = ("/v1/models", "/models")
TOKEN_PATH = "/oauth/token"


async def _drain(transport) -> None:
    """A slow reader: wait for its queued bytes to go out instead of buffering without bound."""
    while transport.get_write_buffer_size() > _HIGH_WATER:
        await asyncio.sleep(0.005)
        if transport.is_closing():
            raise ConnectionResetError("client went away")


class Api:
    """The API handlers, bound to one MockState."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self.counters = state.counters

    def respond(self, status: int, body: bytes, path: str, headers: dict[str, str] | None = None) -> web.Response:
        """A counted JSON response."""
        self.state.counters.response(status, path)
        return web.Response(status=status, body=body, content_type=_JSON, headers=headers)

    def auth_error(self, exc: AuthError, path: str, headers: dict[str, str] | None = None) -> web.Response:
        """A counted 401 (or 400) for a refused credential."""
        type_ = "invalid_request_error" if exc.status == 400 else "authentication_error"
        return self.respond(exc.status, error_body(str(exc), type_, exc.code), path, headers)

    def identity(self, request: web.Request, body: bytes) -> str:
        """The rate-limit identity of an authenticated request; raises AuthError."""
        return self.state.auth.authenticate(request.headers, request.method, request.raw_path, body,
                                            request.remote or "unknown")

    async def generate(self, request: web.Request, kind: str, path: str) -> web.StreamResponse:
        """Chat or text completion, streamed or not."""
        state = self.state
        arrival = time.perf_counter()
        rid = state.request_id()
        with engine.Tracked(state):
            try:
                body = await request.read()
            except web.HTTPException as exc:     # 413: over client_max_size
                return self.respond(exc.status, error_body(exc.reason, "invalid_request_error",
                                                           "request_too_large"), path)
            try:
                identity = self.identity(request, body)
                req = parse_request(body, kind)
                rate_headers, faults = engine.check(state, req, identity)
            except AuthError as exc:
                return self.auth_error(exc, path, {"x-mock-request-id": rid})
            except BadRequest as exc:
                return self.respond(400, error_body(str(exc), "invalid_request_error", exc.code, exc.param), path,
                                    {"x-mock-request-id": rid})
            except Refused as exc:
                return self.respond(exc.status, exc.body, path, {**exc.headers, "x-mock-request-id": rid})

            async def respond(adm: engine.Admission) -> web.StreamResponse:
                if req.stream:
                    return await self._stream(request, adm, path)
                return self.respond(200, await engine.complete(state, adm), path, adm.headers)

            return await engine.generate(state, req, identity, arrival, rid, rate_headers, faults, respond)

    async def _stream(self, request: web.Request, adm: engine.Admission, path: str) -> web.StreamResponse:
        counters = self.state.counters
        resp = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **adm.headers})
        chunked = request.version >= HttpVersion11   # HTTP/1.0: the body simply ends when the connection does
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.force_close()
        await resp.prepare(request)
        counters.response(200, path)
        counters.streams_started += 1
        transport = request.transport
        frame = b"%x\r\ndata: %b\n\n\r\n" if chunked else b"data: %b\n\n"

        def send(payload: bytes):
            # Hot path: frame the HTTP chunk and the SSE event in one bytes object and hand it to the
            # transport in one call (aiohttp's resp.write costs a writelines of three buffers and a
            # coroutine per chunk); write_eof() still ends the chunked body normally.
            if transport is None or transport.is_closing():
                raise ConnectionResetError("client went away")
            transport.write(frame % (len(payload) + 8, payload) if chunked else frame % payload)
            if transport.get_write_buffer_size() > _HIGH_WATER:
                return _drain(transport)
            return None

        try:
            await engine.play(self.state, adm, send)
            await resp.write(_DONE)
            counters.streams_completed += 1
        except StreamCut:
            if request.transport is not None:
                request.transport.close()   # mid-body close: the client sees an incomplete chunked body
        except ConnectionError:
            counters.client_disconnects += 1
        return resp

    async def models(self, request: web.Request, path: str) -> web.Response:
        """GET /v1/models."""
        try:
            self.identity(request, b"")
        except AuthError as exc:
            return self.auth_error(exc, path)
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "opskit-mock"} for m in self.state.models]
        return self.respond(200, dumps({"object": "list", "data": data}), path)

    async def token(self, request: web.Request) -> web.Response:
        """OAuth2 client-credentials token endpoint (form or JSON body, or HTTP Basic)."""
        if self.state.auth.scheme != "oauth2":
            return self.respond(404, error_body("OAuth2 is not enabled on this mock.", "invalid_request_error",
                                                "not_found"), TOKEN_PATH)
        raw = await request.read()
        form: dict[str, str] = {}
        try:
            if request.content_type == _JSON:
                obj = json.loads(raw)
                form = {k: v for k, v in obj.items() if isinstance(v, str)} if isinstance(obj, dict) else {}
            else:
                form = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        except (ValueError, UnicodeDecodeError, RecursionError):
            form = {}
        try:
            issued = self.state.auth.issue_token(form, request.headers.get("Authorization"))
        except AuthError as exc:
            body = dumps({"error": exc.code, "error_description": str(exc)})
            return self.respond(exc.status, body, TOKEN_PATH)
        return self.respond(200, dumps(issued), TOKEN_PATH, {"Cache-Control": "no-store"})

    async def fallback(self, request: web.Request) -> web.Response:
        """Any other path: a counted 405 on a known path, else 404."""
        known = {*CHAT_PATHS, *TEXT_PATHS, *MODEL_PATHS, TOKEN_PATH, ws.WS_PATH}
        if request.path in known:
            return self.respond(405, error_body(f"Method {request.method} not allowed on {request.path}.",
                                                "invalid_request_error", "method_not_allowed"), request.path)
        return self.respond(404, error_body(f"Unknown path {request.path}.", "invalid_request_error",
                                            "not_found"), "other")


def build_app(state: MockState) -> web.Application:
    """The API application (client_max_size raised: long prompts are legitimate)."""
    api = Api(state)
    app = web.Application(client_max_size=64 * 1024 * 1024)

    def bind(method, *args):
        async def handler(request: web.Request) -> web.StreamResponse:
            return await method(request, *args)
        return handler

    for p in CHAT_PATHS:
        app.router.add_post(p, bind(api.generate, "chat", p))
    for p in TEXT_PATHS:
        app.router.add_post(p, bind(api.generate, "text", p))
    for p in MODEL_PATHS:
        app.router.add_get(p, bind(api.models, p))
    app.router.add_post(TOKEN_PATH, api.token)
    app.router.add_get(ws.WS_PATH, bind(ws.handle, state))
    engine_routes.add_routes(app, state)
    app.router.add_route("*", "/{tail:.*}", api.fallback)
    return app
