"""WebSocket transport: `GET /v1/chat/stream`.

Protocol (JSON text messages):
  client -> {"type": "auth", "api_key": "..."}        bearer; oauth2 sends {"token": "..."};
            hmac sends {"api_key": KEYID, "timestamp": "unix s", "signature": hex HMAC-SHA256(secret,
            TIMESTAMP + "GET" + "/v1/chat/stream")}; with auth none the auth message is optional
  client -> {"type": "request", "body": {chat request}}
  server -> {"type": "chunk", "data": {the same chunk JSON as an SSE event}} ...
  server -> {"type": "done"}  or  {"type": "error", "status": 429, "error": {message, type, code}}
Several requests may follow one another on one connection. A failed auth is answered with an error
message and the connection is closed. Outcomes are counted in `counters.ws` by the HTTP status the
same request would have had (the upgrade itself is counted as a 101 response).
"""

from __future__ import annotations

import json
import time

from aiohttp import WSMsgType, web

from opskit.mock import engine
from opskit.mock.auth import WS_PATH, AuthError
from opskit.mock.engine import Refused, StreamCut
from opskit.mock.state import MockState
from opskit.mock.wire import BadRequest, dumps, error_body, parse_request

__all__ = ["WS_PATH", "handle"]


def _error(status: int, message: str, type_: str, code: str) -> str:
    err = json.dumps({"message": message, "type": type_, "param": None, "code": code})
    return f'{{"type":"error","status":{status},"error":{err}}}'


async def handle(request: web.Request, state: MockState) -> web.StreamResponse:
    """Upgrade, then serve auth and request messages until the client closes."""
    sock = web.WebSocketResponse(heartbeat=None, autoping=True)
    if not sock.can_prepare(request).ok:
        state.counters.response(400, WS_PATH)
        return web.Response(status=400, body=error_body("Expected a WebSocket upgrade.", "invalid_request_error",
                                                        "upgrade_required"), content_type="application/json")
    await sock.prepare(request)
    state.counters.response(101, WS_PATH)
    peer = request.remote or "unknown"
    identity = peer if state.auth.scheme == "none" else None
    async for msg in sock:
        if msg.type != WSMsgType.TEXT:
            break
        identity, keep_open = await _message(request, sock, state, msg.data, identity, peer)
        if not keep_open:
            break
    return sock


async def _message(request: web.Request, sock: web.WebSocketResponse, state: MockState, data: str,
                   identity: str | None, peer: str) -> tuple[str | None, bool]:
    """Act on one client message: (the connection's identity now, whether to keep the socket open)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        obj = None
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "auth":
        try:
            return state.auth.ws_authenticate(obj, peer), True
        except AuthError as exc:
            return None, await _refuse(sock, state, str(exc), exc.code)
    if kind == "request":
        if identity is None:
            return None, await _refuse(sock, state, "Send an auth message first.", "invalid_api_key")
        return identity, await _serve(request, sock, state, identity, obj.get("body"))
    _count(state, 400)
    await sock.send_str(_error(400, 'Expected {"type": "auth"|"request", ...}.', "invalid_request_error",
                               "invalid_message"))
    return identity, True


async def _refuse(sock: web.WebSocketResponse, state: MockState, message: str, code: str) -> bool:
    """A 401 error message, then close; returns False (the socket is done)."""
    _count(state, 401)
    await sock.send_str(_error(401, message, "authentication_error", code))
    await sock.close()
    return False


def _count(state: MockState, status: int) -> None:
    ws = state.counters.ws
    ws[str(status)] = ws.get(str(status), 0) + 1


async def _serve(request: web.Request, sock: web.WebSocketResponse, state: MockState, identity: str,
                 body: object) -> bool:
    """One request on the socket; False when the connection is gone (cut or client left)."""
    arrival = time.perf_counter()
    with engine.Tracked(state):
        try:
            # WebSocket requests always stream, whatever the body says.
            req = parse_request(dumps({**body, "stream": True} if isinstance(body, dict) else body), "chat")
            rate_headers, faults = engine.check(state, req, identity)
        except BadRequest as exc:
            _count(state, 400)
            await sock.send_str(_error(400, str(exc), "invalid_request_error", exc.code))
            return True
        except Refused as exc:
            _count(state, exc.status)
            err = json.dumps(json.loads(exc.body)["error"])
            await sock.send_str(f'{{"type":"error","status":{exc.status},"error":{err}}}')
            return True
        return await engine.generate(state, req, identity, arrival, state.request_id(), rate_headers, faults,
                                     lambda adm: _play(request, sock, state, adm))


async def _play(request: web.Request, sock: web.WebSocketResponse, state: MockState, adm: engine.Admission) -> bool:
    counters = state.counters
    _count(state, 200)
    counters.streams_started += 1

    def send(payload: bytes):
        return sock.send_str('{"type":"chunk","data":' + payload.decode() + "}")

    try:
        await engine.play(state, adm, send)
        await sock.send_str('{"type":"done"}')
        counters.streams_completed += 1
        return True
    except StreamCut:
        if request.transport is not None:
            request.transport.close()
        return False
    except ConnectionError:
        counters.client_disconnects += 1
        return False
