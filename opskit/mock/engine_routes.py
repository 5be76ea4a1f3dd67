"""Model-server endpoints beside the OpenAI API, so peer tools run against the mock unchanged.

Always: `GET /health` answers 200 with an empty body (vLLM, SGLang and TGI all do; GuideLLM refuses
a target whose /health fails). With `--engine`:
  vllm    GET /metrics, GET|POST /ping, GET /version, GET /load            (vLLM 0.11 api_server)
  sglang  GET /metrics, GET /health_generate, GET /get_model_info, GET /get_server_info
  tgi     GET /metrics, GET /info
`/metrics` answers 503 while the admin API has `metrics_up` false (the engine's metrics endpoint
gone, for drills). These are probes, not API calls: they are counted apart, under `introspection`
in GET /admin/counters, never in `requests`.
"""

from __future__ import annotations

from aiohttp import web

from opskit.core import engine_catalog as ec
from opskit.mock.state import MockState
from opskit.mock.wire import dumps

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def add_routes(app: web.Application, state: MockState) -> None:
    """Register /health and, when the mock plays an engine, that engine's endpoints."""
    counted = state.counters.introspection

    def route(method: str, path: str, make):
        async def handler(request: web.Request) -> web.Response:
            counted[path] = counted.get(path, 0) + 1
            return make(request)
        app.router.add_route(method, path, handler)

    def empty(_request):
        return web.Response(status=200)

    def body(fn):
        return lambda _request: web.Response(body=dumps(fn()), content_type="application/json")

    route("GET", "/health", empty)
    engine = state.engine
    if engine is None:
        return
    route("GET", "/metrics", lambda _r: metrics(state))
    model, version = state.models[0], ec.VERSIONS[engine]
    if engine == ec.VLLM:
        route("GET", "/ping", empty)
        route("POST", "/ping", empty)
        route("GET", "/version", body(lambda: {"version": version}))
        route("GET", "/load", body(lambda: {"server_load": state.counters.in_flight}))
    elif engine == ec.SGLANG:
        route("GET", "/health_generate", empty)
        route("GET", "/get_model_info", body(lambda: {"model_path": model, "tokenizer_path": model,
                                                      "is_generation": True}))
        route("GET", "/get_server_info", body(lambda: {"version": version, "served_model_name": model,
                                                       "max_total_num_tokens": state.sim.kv_capacity,
                                                       "max_running_requests": state.latency.capacity}))
    else:
        route("GET", "/info", body(lambda: {
            "model_id": model, "model_sha": None, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": state.latency.capacity, "max_best_of": 2, "max_stop_sequences": 4,
            "max_input_tokens": ec.TGI_MAX_INPUT_TOKENS, "max_total_tokens": ec.TGI_MAX_TOTAL_TOKENS,
            "validation_workers": 2, "max_client_batch_size": 4, "router": "text-generation-router",
            "version": version, "sha": None, "docker_label": None}))


def metrics(state: MockState) -> web.Response:
    """The engine's exposition, or 503 while the admin API has taken it down."""
    if not state.metrics_up:
        return web.Response(status=503, text="metrics unavailable (mock admin: metrics_up is false)\n")
    return web.Response(body=state.engine_metrics.render(), headers={"Content-Type": METRICS_TYPE})
