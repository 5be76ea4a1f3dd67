"""Client-side authentication for any transport: bearer keys, OAuth2 client credentials, HMAC signing.

Build one `Authenticator` per target from its `opskit.core.config.AuthConfig` and ask it for the headers
of each request; it does no I/O of its own except fetching OAuth2 tokens.

    auth = Authenticator(target.auth)
    headers = auth.headers("POST", "/v1/chat/completions", body)          # requests / gevent (sync)
    headers = await auth.aheaders("POST", "/v1/chat/completions", body)   # aiohttp (asyncio)
    ws.send(json.dumps(auth.ws_auth_message()))                           # WebSocket transport

Schemes (AuthConfig.scheme):
- none:   no headers.
- bearer: `Authorization: Bearer <api_key>`.
- oauth2: `Authorization: Bearer <token>`; the token comes from a client-credentials grant
  (`POST token_url`, form body `grant_type=client_credentials[&scope=...]`, the client id and secret
  as HTTP Basic), made with the standard library, cached, and fetched again when less than 10 % of its
  lifetime (at most 60 s) is left. Fetches are serialised by a lock, so threads and greenlets share
  one token; `aheaders()` runs a fetch in a worker thread so the event loop never blocks. A failed
  fetch is not repeated for 1 s, then 2, 4, ... up to 30 s: meanwhile every caller gets the same
  AuthError at once (a wrong secret made each of a load test's requests hit the token endpoint,
  ~200 fetches a second).
  `invalidate()` drops the cached token (call it after a 401, then retry once).
- hmac:   `X-DS-APIKey: <api_key>`, `X-DS-Timestamp: <unix seconds>`, `X-DS-Signature: hex
  HMAC-SHA256(secret_key, TIMESTAMP + METHOD + PATH + BODY)`, PATH being the path as sent on the wire
  (query string included). The WebSocket auth message signs `TIMESTAMP + "GET" + WS_PATH`.

A failed token fetch raises `AuthError` with one line naming the URL and the HTTP status or network
reason; no secret ever appears in an error, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from opskit.core.config import AuthConfig

WS_PATH = "/v1/chat/stream"
REFRESH_FRACTION = 0.1    # refresh when this share of the token's lifetime is left...
REFRESH_MAX_S = 60.0      # ...but never earlier than this before expiry
RETRY_BASE_S = 1.0        # after a failed token fetch, the next waits 1, 2, 4, ... s
RETRY_CAP_S = 30.0
REFUSED_STATUSES = (400, 401, 403)  # RFC 6749 5.2: invalid_client is 401 (or 400); retrying will not help


class AuthError(Exception):
    """Credentials could not be obtained; the message is one line and holds no secret.

    `refused` is True when the token endpoint refused the client's credentials (a wrong secret):
    unlike a network failure, no retry can fix that, so a load test stops on it.
    """

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def sign(secret: str, timestamp: str, method: str, path: str, body: bytes) -> str:
    """hex HMAC-SHA256(secret, TIMESTAMP + METHOD + PATH + BODY)."""
    msg = timestamp.encode() + method.upper().encode() + path.encode() + body
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


class Authenticator:
    """Request headers for one target's auth scheme; thread-safe, shareable across requests."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.time, timeout_s: float = 10.0) -> None:
        self.config = config
        self.clock = clock
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._failure: AuthError | None = None  # the last fetch's error, repeated until _retry_at
        self._failures = 0
        self._retry_at = 0.0

    def __repr__(self) -> str:
        return f"Authenticator(scheme={self.config.scheme!r})"

    @property
    def scheme(self) -> str:
        """none | bearer | oauth2 | hmac."""
        return self.config.scheme

    def headers(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        """The auth headers for one request (may fetch an OAuth2 token: blocking)."""
        cfg = self.config
        if cfg.scheme == "bearer":
            return {"Authorization": f"Bearer {cfg.api_key.reveal()}"}
        if cfg.scheme == "oauth2":
            return {"Authorization": f"Bearer {self.token()}"}
        if cfg.scheme == "hmac":
            stamp = str(int(self.clock()))
            return {"X-DS-APIKey": cfg.api_key.reveal(), "X-DS-Timestamp": stamp,
                    "X-DS-Signature": sign(cfg.secret_key.reveal(), stamp, method, path, body)}
        return {}

    async def aheaders(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        """`headers()` for asyncio callers: a token fetch runs in a worker thread."""
        if self.config.scheme == "oauth2" and not self._fresh():
            await asyncio.to_thread(self.token)
        return self.headers(method, path, body)

    def ws_auth_message(self) -> dict[str, str]:
        """The first message of the WebSocket transport: `{"type": "auth", ...credentials}`."""
        cfg, msg = self.config, {"type": "auth"}
        if cfg.scheme == "bearer":
            msg["api_key"] = cfg.api_key.reveal()
        elif cfg.scheme == "oauth2":
            msg["token"] = self.token()
        elif cfg.scheme == "hmac":
            stamp = str(int(self.clock()))
            msg.update(api_key=cfg.api_key.reveal(), timestamp=stamp,
                       signature=sign(cfg.secret_key.reveal(), stamp, "GET", WS_PATH, b""))
        return msg

    def _fresh(self) -> bool:
        return self._token is not None and self.clock() < self._refresh_at

    def token(self) -> str:
        """The cached OAuth2 access token, fetched or refreshed when needed."""
        if self._fresh():
            return self._token
        with self._lock:
            if not self._fresh():      # another thread may have fetched it while we waited
                token, lifetime = self._fetch_backed_off()
                margin = min(REFRESH_MAX_S, lifetime * REFRESH_FRACTION)
                self._token, self._refresh_at = token, self.clock() + lifetime - margin
            return self._token

    def _fetch_backed_off(self) -> tuple[str, float]:
        """A fetch, unless the last one failed less than its back-off ago: then its error again."""
        if self._failure is not None and self.clock() < self._retry_at:
            raise self._failure
        try:
            result = self._fetch()
        except AuthError as exc:
            self._failures += 1
            self._failure = exc
            self._retry_at = self.clock() + min(RETRY_CAP_S, RETRY_BASE_S * 2 ** (self._failures - 1))
            raise
        self._failure, self._failures = None, 0
        return result

    def invalidate(self) -> None:
        """Forget the cached token (after the server refused it)."""
        with self._lock:
            self._token, self._refresh_at = None, 0.0

    def _fetch(self) -> tuple[str, float]:
        cfg = self.config
        form = {"grant_type": "client_credentials"}
        if cfg.scope:
            form["scope"] = cfg.scope
        basic = base64.b64encode(f"{cfg.client_id}:{cfg.client_secret.reveal()}".encode()).decode()
        req = urllib.request.Request(cfg.token_url, data=urllib.parse.urlencode(form).encode(), method="POST",
                                     headers={"Authorization": f"Basic {basic}", "Accept": "application/json",
                                              "Content-Type": "application/x-www-form-urlencoded"})
        where = f"oauth2 token request to {_redacted(cfg.token_url)}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read(1 << 20)
        except urllib.error.HTTPError as exc:
            if exc.code in REFUSED_STATUSES:
                raise AuthError(f"credentials refused by the token endpoint {_redacted(cfg.token_url)} "
                                f"(HTTP {exc.code}{_oauth_error(exc, ', ')})", refused=True) from None
            raise AuthError(f"{where} failed: HTTP {exc.code}{_oauth_error(exc)}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:   # ValueError: e.g. a bad port
            reason = getattr(exc, "reason", None) or exc
            raise AuthError(f"{where} failed: {str(reason).splitlines()[0] if str(reason) else type(exc).__name__}") from None
        try:
            body = json.loads(raw)
            token = body["access_token"]
            lifetime = float(body.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise AuthError(f"{where} returned no access_token") from None
        if not isinstance(token, str) or not token or lifetime <= 0:
            raise AuthError(f"{where} returned an unusable token")
        return token, lifetime


def _redacted(url: str) -> str:
    """The URL without user info or query string, which may carry credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    port = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]
    if port:
        netloc += f":{port}"    # as written, even when it is out of range
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _oauth_error(exc: urllib.error.HTTPError, sep: str = "") -> str:
    """` (invalid_client)` (or `, invalid_client` with sep=", "): the OAuth2 error code from the body,
    when there is one (never a secret)."""
    try:
        code = json.loads(exc.read(4096)).get("error")
    except (ValueError, AttributeError, OSError):
        return ""
    if not (isinstance(code, str) and code.replace("_", "").isalnum()):
        return ""
    return f"{sep}{code}" if sep else f" ({code})"
