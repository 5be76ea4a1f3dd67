"""Server-side authentication of the mock: none, bearer keys, OAuth2 client credentials, HMAC.

- bearer: `Authorization: Bearer KEY`, KEY one of `--api-key` / $OPSKIT_MOCK_API_KEYS.
- oauth2: `POST /oauth/token` (form or JSON body, `grant_type=client_credentials`, client id and
  secret in the body or HTTP Basic) issues an opaque token valid for `token_ttl_s`; API calls then
  send `Authorization: Bearer TOKEN`.
- hmac: `X-DS-APIKey: KEYID`, `X-DS-Timestamp: unix seconds`, `X-DS-Signature: hex
  HMAC-SHA256(secret, TIMESTAMP + METHOD + PATH + BODY)` where PATH is the request path as sent
  (with its query string, if any); a timestamp more than 300 s away from the server's clock is refused.

`authenticate()` returns the caller's identity (used as the rate-limit key; never a secret: a key
is reduced to a short hash) or raises AuthError carrying an OpenAI-style code. Nothing here logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from opskit.core.auth import WS_PATH, sign  # one definition of the signature, shared with the client

SCHEMES = ("none", "bearer", "oauth2", "hmac")
MAX_SKEW_S = 300.0


class AuthError(Exception):
    """A refused credential: `code` goes into the 401 body, the message never holds the secret."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code, self.status = code, status


def _fingerprint(secret: str) -> str:
    """A stable, non-reversible name for a key, for rate-limit identities."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass
class ServerAuth:
    """The configured scheme and its credentials; issued OAuth2 tokens live here too."""

    scheme: str = "none"
    api_keys: frozenset[str] = frozenset()          # bearer keys
    hmac_keys: dict[str, str] = field(default_factory=dict)   # key id -> secret
    clients: dict[str, str] = field(default_factory=dict)     # client id -> secret
    token_ttl_s: float = 3600.0
    clock: object = time.time
    _tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (client, expiry)

    def authenticate(self, headers: Mapping[str, str], method: str, path: str, body: bytes,
                     peer: str) -> str:
        """The identity of an authenticated API request, or AuthError."""
        if self.scheme == "none":
            return peer
        if self.scheme == "hmac":
            return self.check_hmac(headers.get("X-DS-APIKey"), headers.get("X-DS-Timestamp"),
                                   headers.get("X-DS-Signature"), method, path, body)
        value = headers.get("Authorization", "")
        if not value.startswith("Bearer ") or not value[7:].strip():
            raise AuthError("invalid_api_key", "Authentication required: send 'Authorization: Bearer ...'.")
        return self.check_bearer(value[7:].strip())

    def check_bearer(self, credential: str) -> str:
        """A bearer key (scheme bearer) or an issued token (scheme oauth2)."""
        if self.scheme == "bearer":
            if credential in self.api_keys:
                return _fingerprint(credential)
            raise AuthError("invalid_api_key", "Incorrect API key provided.")
        entry = self._tokens.get(credential)
        if entry is None:
            raise AuthError("invalid_api_key", "Invalid access token.")
        client, expiry = entry
        if self.clock() >= expiry:
            self._tokens.pop(credential, None)
            raise AuthError("token_expired", "The access token has expired; fetch a new one.")
        return "client-" + client

    def check_hmac(self, key_id: str | None, stamp: str | None, signature: str | None, method: str,
                   path: str, body: bytes) -> str:
        """Verify an HMAC-signed request (headers X-DS-APIKey, X-DS-Timestamp, X-DS-Signature)."""
        if not key_id or not stamp or not signature:
            raise AuthError("invalid_api_key", "Missing X-DS-APIKey, X-DS-Timestamp or X-DS-Signature header.")
        secret = self.hmac_keys.get(key_id)
        if secret is None:
            raise AuthError("invalid_api_key", "Unknown API key id.")
        try:
            ts = float(stamp)
        except ValueError:
            raise AuthError("invalid_timestamp", "X-DS-Timestamp must be unix seconds.") from None
        if abs(self.clock() - ts) > MAX_SKEW_S:
            raise AuthError("invalid_timestamp", f"X-DS-Timestamp is more than {MAX_SKEW_S:.0f} s from server time.")
        expected = sign(secret, stamp, method, path, body)
        if not hmac.compare_digest(expected, signature.strip().lower()):
            raise AuthError("invalid_signature", "The request signature does not match.")
        return "key-" + key_id

    def issue_token(self, form: Mapping[str, str], authorization: str | None) -> dict:
        """Client-credentials grant: a new token, or AuthError (OAuth2 error codes)."""
        if form.get("grant_type") != "client_credentials":
            raise AuthError("unsupported_grant_type", "grant_type must be client_credentials.", 400)
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if authorization and authorization.startswith("Basic "):
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
                client_id, _, client_secret = decoded.partition(":")
            except (ValueError, UnicodeDecodeError):
                raise AuthError("invalid_client", "Malformed HTTP Basic credentials.") from None
        known = self.clients.get(client_id or "")
        if known is None or not isinstance(client_secret, str) or not hmac.compare_digest(known, client_secret):
            raise AuthError("invalid_client", "Unknown client or wrong client secret.")
        self._expire()
        token = secrets.token_urlsafe(24)
        self._tokens[token] = (client_id, self.clock() + self.token_ttl_s)
        return {"access_token": token, "token_type": "Bearer", "expires_in": int(self.token_ttl_s)}

    def _expire(self) -> None:
        now = self.clock()
        for tok in [t for t, (_, exp) in self._tokens.items() if exp <= now]:
            del self._tokens[tok]

    def ws_authenticate(self, msg: Mapping[str, object], peer: str) -> str:
        """Credentials from a WebSocket `{"type": "auth", ...}` message (same schemes)."""
        if self.scheme == "none":
            return peer
        if self.scheme == "hmac":
            vals = [msg.get(k) for k in ("api_key", "timestamp", "signature")]
            if not all(isinstance(v, str | int | float) for v in vals):
                raise AuthError("invalid_api_key", "auth message needs api_key, timestamp and signature.")
            return self.check_hmac(str(vals[0]), str(vals[1]), str(vals[2]), "GET", WS_PATH, b"")
        cred = msg.get("token") if self.scheme == "oauth2" else msg.get("api_key")
        cred = cred or msg.get("api_key") or msg.get("token")
        if not isinstance(cred, str) or not cred:
            raise AuthError("invalid_api_key", "auth message needs api_key (or token for oauth2).")
        return self.check_bearer(cred)


def parse_pairs(values: list[str], what: str, shape: str = "ID:SECRET") -> dict[str, str]:
    """`ID:SECRET` strings -> {id: secret}; ValueError names the flag, never the secret."""
    out: dict[str, str] = {}
    for i, v in enumerate(values):
        ident, sep, secret = v.partition(":")
        if not sep or not ident or not secret:
            raise ValueError(f"{what} #{i + 1}: expected {shape}")
        out[ident] = secret
    return out
