"""The canary: one call before any load, with the run's own client, auth and proxy.

A wrong target (nothing listening, TLS refused, a path typo, a wrong key, an unknown model) would
otherwise become a whole run of failures: tens of thousands of requests at a dead port, or a flood
of unauthorised calls on someone's paid account. `check` sends one small request the way the first
scenario will and raises RunError (exit 2) with one line naming the cause. Anything that shows the
target reached, understood and accepted the request passes: a 2xx, a 429 (the target is busy, the
circuit breaker watches the run), or a server error the target itself answered.

It runs in the gate's own process: client.py needs gevent and geventhttpclient but not Locust
(which monkey-patches the standard library and must stay in its own processes).
"""

from __future__ import annotations

import json
import re

from opskit.core import records
from opskit.core.cli_helpers import redact_url
from opskit.loadtest.params import RunParams

# what a refusal body says when the model is the problem (OpenAI: model_not_found; DeepSeek: "Model Not Exist")
MODEL_WORDS = re.compile(r"model", re.I)
KEYISH = re.compile(r"\b(sk|key|tok)[-_][A-Za-z0-9*_\-]{6,}", re.I)  # a key echoed back, even masked


class CanaryFailed(Exception):
    """The canary call failed: the message is the one line to print."""


def body_for(p: RunParams) -> dict:
    """The smallest request the scenario's users would send: one short message, one token."""
    body = {"model": p.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "stream": p.stream}
    if p.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def call(p: RunParams) -> tuple[dict, str | None]:
    """Send the canary through the client the Locust users use: its log row (with a refusal's body), and
    why the token endpoint refused the credentials, if it did."""
    from opskit.loadtest.client import ChatClient, auth_for

    auth, ws_auth = auth_for(p)
    client = ChatClient(p.base_url, p.path, auth=auth, timeout_s=p.timeout_s, pool_size=1, ws_auth=ws_auth)
    client.keep_error_body = True
    try:
        return client.call(body_for(p), None, p.transport if p.stream else "sse"), client.refused
    finally:
        client.close()


def _message(row: dict) -> str:
    """The refusal's own words (error.message, else error.code/type), bounded and with keys masked."""
    raw = row.get("error_body") or ""
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict):
        text = str(err.get("message") or err.get("code") or err.get("type") or "")
    elif isinstance(err, str):
        text = err
    else:
        text = raw if raw[:1] not in "<{[" else ""
    text = KEYISH.sub("<redacted>", " ".join(text.split()))
    return text[:160]


def explain(row: dict, tried: str, scheme: str, model: str, timeout_s: float) -> str | None:
    """Why the canary's row means the run cannot work, in one line; None when the target answered."""
    status, kind, err = row.get("status") or 0, row.get("error_type") or "", str(row.get("error") or "")
    said = _message(row)
    if not kind or kind in (records.RATE_LIMITED, records.STREAM_BROKEN):
        return None  # reached and accepted (a 429, a broken stream: the run's business, not the config's)
    if err.startswith("no credentials"):
        return f"{err} (auth scheme {scheme})"
    if kind == records.TIMEOUT:
        return f"no answer from {tried} within {timeout_s:g} s (--timeout)" + (f": {said}" if said else "")
    if kind == records.CONNECTION or status == 0:
        return f"cannot reach {tried}: {_connection_cause(err + ' ' + said)}"
    if status in (401, 403):
        hint = ("no credentials configured: set $OPSKIT_API_KEY or auth in --config" if scheme == "none"
                else f"auth scheme {scheme}: check the key ($OPSKIT_API_KEY or the config's auth)")
        return f"HTTP {status} from {tried}: credentials refused ({hint})" + (f"; target says: {said}" if said else "")
    named = "model_not_found" in (row.get("error_body") or "") or MODEL_WORDS.search(said) and (
        model in said or "not exist" in said.lower() or "unknown" in said.lower())
    if status in (400, 404, 422) and named:
        return f"unknown model {model!r} at {tried} (--model, or the config's models): {said}"
    if status == 404:
        return (f"HTTP 404 for POST {tried}: no such path; the target URL is the API root that "
                f"/chat/completions is appended to (e.g. https://api.deepseek.com or http://host:8000/v1)")
    if 400 <= status < 500:
        return f"HTTP {status} from {tried}: the target refused the request" + (f": {said}" if said else "")
    return None  # a server error the target answered itself: it is reachable; the circuit breaker watches


def _connection_cause(text: str) -> str:
    low = text.lower()
    if "refused" in low:
        return "connection refused (nothing listening there?)"
    if "ssl" in low or "certificate" in low or "tls" in low:
        return f"TLS handshake failed ({text.strip()})"
    if "gaierror" in low or "name or service" in low or "nodename" in low:
        return "host name not resolved"
    return text.strip() or "connection failed"


def check(p: RunParams, target_url: str, scheme: str) -> None:
    """One canary call; CanaryFailed with the cause when the run could not work."""
    row, refused = call(p)
    if refused:  # the token endpoint refused the credentials: the line a Locust process would write
        raise CanaryFailed(f"[{p.scenario}] {refused}")
    tried = redact_url(target_url.rstrip("/") + ("" if p.transport == "ws" and p.stream else p.path))
    why = explain(row, tried, scheme, p.model, p.timeout_s)
    if why:
        raise CanaryFailed(f"canary call failed, no load sent: {why}")


def preflight(opts, run_dir, target, model: str, scheme: str) -> None:
    """The canary of a run (runner.Options, an open runner.Target), sent the way its first scenario
    sends; runner.RunError (exit 2) naming the cause."""
    from dataclasses import replace

    from opskit.loadtest import runner

    params = runner.scenario_params(opts, opts.scenarios[0], run_dir, target, model)
    if params.transport == "ws":  # the WebSocket transport goes direct, never through the proxy
        params = replace(params, base_url=target.url)
    try:
        check(params, target.url, scheme)
    except CanaryFailed as exc:
        raise runner.RunError(str(exc)) from None
