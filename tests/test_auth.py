"""opskit.core.auth (client side) against the mock's real auth schemes, over real HTTP and WebSocket."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import websocket

from opskit.core.auth import Authenticator, AuthError, sign
from opskit.core.config import AuthConfig, Secret

pytestmark = pytest.mark.slow

BODY = json.dumps({"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 3}).encode()
PATH = "/v1/chat/completions"
FAST = ("--ttft-ms", "1", "--itl-ms", "0", "--ttft-jitter-ms", "0", "--itl-jitter-ms", "0")


def post(mock, headers: dict, body: bytes = BODY, path: str = PATH) -> tuple[int, dict]:
    req = urllib.request.Request(mock.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def counters(mock) -> dict:
    with urllib.request.urlopen(mock.admin_url + "/admin/counters", timeout=10) as resp:
        return json.loads(resp.read())


def ws_chat(mock, auth_msg: dict) -> list[dict]:
    """One WebSocket request after `auth_msg`; the server's messages up to done/error."""
    ws = websocket.create_connection(mock.url.replace("http", "ws") + "/v1/chat/stream", timeout=10)
    try:
        ws.send(json.dumps(auth_msg))
        ws.send(json.dumps({"type": "request", "body": json.loads(BODY)}))
        out = []
        while True:
            msg = json.loads(ws.recv())
            out.append(msg)
            if msg["type"] in ("done", "error"):
                return out
    finally:
        ws.close()


def test_bearer_round_trip_sdk_and_ws(start_mock, monkeypatch):
    monkeypatch.setenv("OPSKIT_MOCK_API_KEYS", "sk-env-1, sk-env-2")
    mock = start_mock("--auth", "bearer", "--api-key", "sk-flag", *FAST)
    for key in ("sk-flag", "sk-env-2"):
        auth = Authenticator(AuthConfig(scheme="bearer", api_key=Secret(key)))
        assert post(mock, auth.headers("POST", PATH, BODY))[0] == 200
        assert ws_chat(mock, auth.ws_auth_message())[-1]["type"] == "done"
    client = openai.OpenAI(base_url=mock.api, api_key="sk-flag", max_retries=0, timeout=10)
    assert client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=2).usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=mock.api, api_key="sk-wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.code == "invalid_api_key" and "sk-wrong" not in str(err.value)
    status, body = post(mock, {})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    last = ws_chat(mock, {"type": "auth", "api_key": "sk-wrong"})[-1]
    assert last["type"] == "error" and last["status"] == 401
    c = counters(mock)
    assert c["requests"]["401"] == 2 and c["ws"]["401"] == 1 and c["ws"]["200"] == 2


def test_hmac_round_trip_and_refusals(start_mock):
    mock = start_mock("--auth", "hmac", "--api-key", "kid1:s3cret", *FAST)
    good = Authenticator(AuthConfig(scheme="hmac", api_key=Secret("kid1"), secret_key=Secret("s3cret")))
    assert post(mock, good.headers("POST", PATH, BODY))[0] == 200
    asyncio.run(asyncio.wait_for(good.aheaders("POST", PATH, BODY), 5))
    assert ws_chat(mock, good.ws_auth_message())[-1]["type"] == "done"

    wrong = Authenticator(AuthConfig(scheme="hmac", api_key=Secret("kid1"), secret_key=Secret("other")))
    status, body = post(mock, wrong.headers("POST", PATH, BODY))
    assert status == 401 and body["error"]["code"] == "invalid_signature"
    skewed = Authenticator(AuthConfig(scheme="hmac", api_key=Secret("kid1"), secret_key=Secret("s3cret")),
                           clock=lambda: time.time() - 301)
    status, body = post(mock, skewed.headers("POST", PATH, BODY))
    assert status == 401 and body["error"]["code"] == "invalid_timestamp"
    # A signature over a different body (tampering) is refused.
    status, body = post(mock, good.headers("POST", PATH, BODY), body=BODY.replace(b"3}", b"4}"))
    assert status == 401 and body["error"]["code"] == "invalid_signature"
    assert ws_chat(mock, skewed.ws_auth_message())[-1]["status"] == 401


def test_sign_is_the_documented_formula():
    import hashlib
    import hmac
    expected = hmac.new(b"k", b"1700000000POST/v1/x{}", hashlib.sha256).hexdigest()
    assert sign("k", "1700000000", "post", "/v1/x", b"{}") == expected


def test_oauth2_fetch_cache_refresh_and_expiry(start_mock):
    mock = start_mock("--auth", "oauth2", "--client", "app:cl-secret", "--token-ttl-s", "1", *FAST)
    cfg = AuthConfig(scheme="oauth2", token_url=mock.url + "/oauth/token", client_id="app",
                     client_secret=Secret("cl-secret"))
    auth = Authenticator(cfg)
    # Eight threads at once share one fetch (the lock), and the token works.
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(auth.headers("POST", PATH, BODY))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len({r["Authorization"] for r in results}) == 1
    assert post(mock, results[0])[0] == 200
    assert counters(mock)["by_path"]["/oauth/token"] == 1
    # After the lifetime the old token is refused as expired, and the authenticator fetches a new one.
    time.sleep(1.1)
    status, body = post(mock, results[0])
    assert status == 401 and body["error"]["code"] == "token_expired"
    fresh = asyncio.run(asyncio.wait_for(auth.aheaders("POST", PATH, BODY), 10))
    assert fresh != results[0] and post(mock, fresh)[0] == 200
    assert ws_chat(mock, auth.ws_auth_message())[-1]["type"] == "done"
    assert counters(mock)["by_path"]["/oauth/token"] == 2


def test_oauth2_token_endpoint_refusals(start_mock):
    mock = start_mock("--auth", "oauth2", "--client", "app:cl-secret")
    wrong = Authenticator(AuthConfig(scheme="oauth2", token_url=mock.url + "/oauth/token", client_id="app",
                                     client_secret=Secret("not-the-secret")))
    with pytest.raises(AuthError) as err:
        wrong.headers("POST", PATH)
    msg = str(err.value)
    assert msg == f"credentials refused by the token endpoint {mock.url}/oauth/token (HTTP 401, invalid_client)"
    assert err.value.refused and "not-the-secret" not in msg
    # JSON body with credentials inside it is also accepted by the server.
    req = urllib.request.Request(mock.url + "/oauth/token", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"grant_type": "client_credentials", "client_id": "app",
                                                  "client_secret": "cl-secret"}).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        issued = json.loads(resp.read())
    assert issued["token_type"] == "Bearer" and issued["expires_in"] == 3600
    status, body = post(mock, {"Authorization": "Bearer made-up"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_oauth2_failed_fetches_back_off_for_every_caller(start_mock):
    # A wrong secret made every request of a load test fetch a token (~200 a second): after a failure
    # all callers get the same error at once until the back-off (1 s, 2 s, ...) has passed.
    mock = start_mock("--auth", "oauth2", "--client", "app:cl-secret")
    now = [1000.0]
    cfg = AuthConfig(scheme="oauth2", token_url=mock.url + "/oauth/token", client_id="app",
                     client_secret=Secret("not-the-secret"))
    auth = Authenticator(cfg, clock=lambda: now[0])
    fetches = lambda: counters(mock)["by_path"].get("/oauth/token", 0)  # noqa: E731
    errors = []
    for _ in range(50):
        with pytest.raises(AuthError) as err:
            auth.headers("POST", PATH, BODY)
        errors.append(err.value)
    assert fetches() == 1 and all(e is errors[0] for e in errors) and errors[0].refused
    now[0] += 1.0  # the first back-off has passed: one more fetch, then 2 s of quiet
    for _ in range(2):
        with pytest.raises(AuthError):
            auth.headers("POST", PATH, BODY)
    assert fetches() == 2
    now[0] += 1.5
    with pytest.raises(AuthError):
        auth.headers("POST", PATH, BODY)
    assert fetches() == 2
    # the right secret, after the back-off: a token, and the failure count starts again
    object.__setattr__(cfg, "client_secret", Secret("cl-secret"))
    now[0] += 0.5
    assert post(mock, auth.headers("POST", PATH, BODY))[0] == 200 and fetches() == 3


def test_oauth2_unreachable_token_url_is_one_line():
    import socket
    with socket.socket() as s:     # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://user:zzz-pw@127.0.0.1:{port}/token?key=zzz-q"     # credentials in a URL stay out too
    auth = Authenticator(AuthConfig(scheme="oauth2", token_url=url, client_id="a",
                                    client_secret=Secret("zzz-secret")), timeout_s=2)
    with pytest.raises(AuthError) as err:
        auth.token()
    assert str(err.value).startswith(f"oauth2 token request to http://127.0.0.1:{port}/token failed:")
    assert "zzz" not in str(err.value) and "\n" not in str(err.value)
    assert "zzz" not in repr(auth)


def test_none_scheme_needs_nothing(mock_server):
    auth = Authenticator(AuthConfig())
    assert auth.headers("POST", PATH, BODY) == {}
    assert post(mock_server, {})[0] == 200
    assert ws_chat(mock_server, auth.ws_auth_message())[-1]["type"] == "done"
