"""The embedded OpenAI-compatible mock LLM server (`opskit mock`).

Modules: settings (tunables + validation), model (latency model, schedules), limits (capacity gate,
rate limits, quotas), auth (server-side schemes), wire (request parsing, bodies, chunk templates),
state (shared state, counters, fault dice), engine (one generation), server (HTTP API), ws
(WebSocket API), admin (admin API), run (process plumbing), cli (the click command).
"""
