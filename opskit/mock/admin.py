"""The admin listener (loopback only): read and change faults, limits and latency; read counters.

  GET/PUT /admin/faults    {"error_rate": {"500": 0.05}, "hang_rate", "cut_rate", "malformed_rate", "extra_ttft_ms"}
  GET/PUT /admin/limits    {"rpm", "tpm", "daily_quota" (null = off), "window_s"}
  GET/PUT /admin/latency   {"ttft_ms", "ttft_jitter_ms", "itl_ms", "itl_jitter_ms", "output_tokens_mean",
                            "output_tokens_spread", "tokens_per_chunk", "capacity"}
  GET/PUT /admin/engine    {"kv_capacity_tokens" (needs --engine), "capacity", "metrics_up" (false: /metrics
                            answers 503)}; GET adds the engine model's state (running, waiting, KV usage, ...)
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


class _Live:
    """A section whose JSON is computed when read."""

    def __init__(self, fn) -> None:
        self.to_json = fn


class Admin:
    """Admin handlers bound to one MockState; each settings section has a getter and an updater."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self.sections = {
            "faults": (lambda: state.faults, state.faults.update),
            "limits": (lambda: state.limits, state.limits.update),
            "latency": (lambda: state.latency, state.apply_latency),
            "engine": (lambda: _Live(state.engine_json), state.apply_engine),
        }

    async def get(self, request: web.Request) -> web.Response:
        """GET /admin/{section}: the current settings."""
        current, _ = self.sections[request.match_info["section"]]
        return _json(current().to_json())

    async def put(self, request: web.Request) -> web.Response:
        """PUT /admin/{section}: validate and apply a partial update; 400 changes nothing."""
        current, update = self.sections[request.match_info["section"]]
        try:
            changes = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _bad("the body is not valid JSON")
        try:
            update(changes)
        except SettingsError as exc:
            return _bad(str(exc))
        return _json(current().to_json())

    async def counters(self, request: web.Request) -> web.Response:
        """GET /admin/counters."""
        return _json(self.state.counters.to_json())

    async def lateness(self, request: web.Request) -> web.Response:
        """GET /admin/lateness."""
        return _json(self.state.lateness.to_json())

    async def reset(self, request: web.Request) -> web.Response:
        """POST /admin/reset: zero counters and lateness, forget rate windows and quotas."""
        self.state.reset()
        return _json(self.state.counters.to_json())


def build_admin_app(state: MockState) -> web.Application:
    """The admin application bound to `state`."""
    admin, app = Admin(state), web.Application()
    section = "/admin/{section:faults|limits|latency|engine}"
    app.router.add_get(section, admin.get)
    app.router.add_put(section, admin.put)
    app.router.add_get("/admin/counters", admin.counters)
    app.router.add_get("/admin/lateness", admin.lateness)
    app.router.add_post("/admin/reset", admin.reset)
    return app
