"""The admin listener (loopback only): read and change faults, limits and latency; read counters.

  GET/PUT /admin/faults    {"error_rate": {"500": 0.05}, "hang_rate", "cut_rate", "malformed_rate", "extra_ttft_ms"}
  GET/PUT /admin/limits    {"rpm", "tpm", "daily_quota" (null = off), "window_s"}
  GET/PUT /admin/latency   {"ttft_ms", "ttft_jitter_ms", "itl_ms", "itl_jitter_ms", "output_tokens_mean",
                            "output_tokens_spread", "tokens_per_chunk", "capacity"}
  GET     /admin/counters  see state.Counters.to_json
  GET     /admin/lateness  histogram of how late stream chunks left vs. their schedule (the mock's own jitter)
  POST    /admin/reset     zero counters and lateness, forget rate-limit windows and quotas
PUT takes a partial object and answers with the whole new settings; bad input is a 400 with
`{"error": {"message": ...}}` and changes nothing. Admin calls are not counted in the API counters.
"""

from __future__ import annotations

import json

from aiohttp import web

from opskit.mock.settings import SettingsError
from opskit.mock.state import MockState
from opskit.mock.wire import dumps, error_body


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(obj), content_type="application/json")


def _bad(message: str) -> web.Response:
    return web.Response(status=400, body=error_body(message, "invalid_request_error", "invalid_admin_request"),
                        content_type="application/json")


def build_admin_app(state: MockState) -> web.Application:
    """The admin application bound to `state`."""
    app = web.Application()
    sections = {
        "faults": (lambda: state.faults, state.faults.update),
        "limits": (lambda: state.limits, state.limits.update),
        "latency": (lambda: state.latency, state.apply_latency),
    }

    def getter(name: str):
        async def get(request: web.Request) -> web.Response:
            return _json(sections[name][0]().to_json())
        return get

    def putter(name: str):
        async def put(request: web.Request) -> web.Response:
            try:
                changes = json.loads(await request.read())
            except (ValueError, UnicodeDecodeError):
                return _bad("the body is not valid JSON")
            try:
                sections[name][1](changes)
            except SettingsError as exc:
                return _bad(str(exc))
            return _json(sections[name][0]().to_json())
        return put

    for name in sections:
        app.router.add_get(f"/admin/{name}", getter(name))
        app.router.add_put(f"/admin/{name}", putter(name))

    async def counters(request: web.Request) -> web.Response:
        return _json(state.counters.to_json())

    async def reset(request: web.Request) -> web.Response:
        state.reset()
        return _json(state.counters.to_json())

    async def lateness(request: web.Request) -> web.Response:
        return _json(state.lateness.to_json())

    app.router.add_get("/admin/counters", counters)
    app.router.add_get("/admin/lateness", lateness)
    app.router.add_post("/admin/reset", reset)
    return app
