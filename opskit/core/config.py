"""Targets and settings: a YAML file, then environment variables, then command-line flags.

A config file looks like this (every key optional except a target's name and base_url):

    targets:
      - name: deepseek
        base_url: https://api.deepseek.com      # the API root; /chat/completions is appended
        kind: hosted                           # hosted | private
        models: [deepseek-chat, deepseek-reasoner]
        daily_quota_requests: 100000           # optional, for the quota alert
        prices: {currency: USD, per_million_tokens: {deepseek-chat: {input: 0.27, output: 1.10}}}
                                               # optional, for spend (opskit.core.pricing)
        auth:
          scheme: bearer                       # none | bearer | oauth2 | hmac
          api_key_env: DEEPSEEK_API_KEY        # or api_key_file: /run/secrets/key
    probe: {interval_s: 60, prompt: "Say OK.", max_tokens: 8, timeout_s: 30}

Secrets are read from the environment or from files named in the config, never from the config
itself, and are never printed: `Secret` hides its value from repr() and str().
A malformed config raises ConfigError, which the CLI prints as one line and exits 2.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from opskit.core import pricing
from opskit.core.pricing import Prices

KINDS = ("hosted", "private")
SCHEMES = ("none", "bearer", "oauth2", "hmac")
ENV_TARGET_URL = "OPSKIT_TARGET_URL"
ENV_API_KEY = "OPSKIT_API_KEY"
ENV_API_KEY_FILE = "OPSKIT_API_KEY_FILE"
TARGET_KEYS = ("name", "base_url", "kind", "models", "daily_quota_requests", "timeout_s", "auth", "prices")
AUTH_KEYS = ("scheme", "api_key_env", "api_key_file", "secret_key_env", "secret_key_file", "token_url",
             "client_id", "client_secret_env", "client_secret_file", "scope")
PROBE_KEYS = ("interval_s", "prompt", "max_tokens", "timeout_s", "model")


class ConfigError(Exception):
    """A config problem, printed as one line: `FILE: KEY: expected WHAT`."""

    def __init__(self, source: str, key: str, expected: str) -> None:
        self.source, self.key, self.expected = source, key, expected
        where = f"{source}: {key}" if key else source
        super().__init__(f"config error: {where}: expected {expected}")


class Secret:
    """A secret value that never shows itself in logs, reprs or error messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class AuthConfig:
    """How to authenticate to a target. Secrets are resolved at load time."""

    scheme: str = "none"
    api_key: Secret | None = None          # bearer key, or the HMAC key id (X-DS-APIKey)
    secret_key: Secret | None = None       # HMAC signing secret
    token_url: str | None = None           # OAuth2 client-credentials
    client_id: str | None = None
    client_secret: Secret | None = None
    scope: str | None = None


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str
    kind: str = "private"
    models: tuple[str, ...] = ("deepseek-chat",)
    auth: AuthConfig = field(default_factory=AuthConfig)
    daily_quota_requests: int | None = None
    timeout_s: float = 60.0
    prices: Prices | None = None  # no spend without them: no price is built in


@dataclass(frozen=True)
class ProbeConfig:
    interval_s: float = 60.0
    prompt: str = "Reply with the single word OK."
    max_tokens: int = 8
    timeout_s: float = 30.0
    model: str | None = None  # default: the target's first model


@dataclass(frozen=True)
class Config:
    targets: tuple[Target, ...] = ()
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    source: str = "<defaults>"

    def target(self, name: str | None = None) -> Target:
        """The named target, or the first one."""
        if not self.targets:
            raise ConfigError(self.source, "targets", "at least one target (or --target / $OPSKIT_TARGET_URL)")
        if name is None:
            return self.targets[0]
        for t in self.targets:
            if t.name == name:
                return t
        raise ConfigError(self.source, "targets", f"a target named {name!r}")


def _expect(cond: bool, source: str, key: str, what: str) -> None:
    if not cond:
        raise ConfigError(source, key, what)


def _known(spec: dict, allowed: tuple[str, ...], source: str, key: str, also: tuple[str, ...] = ()) -> None:
    """A misspelt key (`api_key_evn`, `interval`) is an error, not a setting silently left at its default.
    Keys in `also` pass here unlisted (an inline secret gets its own error later)."""
    unknown = sorted(str(k) for k in spec if k not in allowed and k not in also)
    _expect(not unknown, source, f"{key}.{unknown[0]}" if unknown else key, f"one of {', '.join(allowed)}")


def _positive(value: object) -> bool:
    """A positive, finite number (YAML's .inf would make a probe never run or never time out)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _positive_int(value: object) -> bool:
    """A positive integer; YAML's `true` is a bool, and a bool is never a number here (it was quota 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def url_problem(value: object) -> str | None:
    """Why `value` is not a usable http(s) URL (a port out of range, a broken [IPv6] literal, no host),
    or None. urllib only finds some of these when the URL is used, as a traceback far from the flag."""
    if not isinstance(value, str):
        return "an http:// or https:// URL"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range or not a number
    except ValueError as exc:
        return f"an http:// or https:// URL with a valid host and port ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "an http:// or https:// URL"
    return None


def _url(value: object, source: str, key: str) -> str:
    problem = url_problem(value)
    _expect(problem is None, source, key, problem or "")
    return str(value).rstrip("/")


def _read_text(path: Path) -> str:
    """A text file's contents; OSError, or UnicodeDecodeError for a binary file (not text at all)."""
    return path.read_text(encoding="utf-8")


def _read_secret(spec: dict, stem: str, source: str, key: str, env: dict[str, str]) -> Secret | None:
    """A secret from `<stem>_env` (a variable name) or `<stem>_file` (a path); never inline."""
    if stem in spec:
        raise ConfigError(source, f"{key}.{stem}", f"{stem}_env or {stem}_file (secrets are not written in configs)")
    var, path = spec.get(f"{stem}_env"), spec.get(f"{stem}_file")
    if var is not None:
        _expect(isinstance(var, str), source, f"{key}.{stem}_env", "an environment variable name")
        _expect(var in env, source, f"{key}.{stem}_env", f"${var} to be set")
        return Secret(env[var].strip())
    if path is not None:
        _expect(isinstance(path, str), source, f"{key}.{stem}_file", "a file path")
        try:
            return Secret(_read_text(Path(path).expanduser()).strip())
        except OSError as exc:
            raise ConfigError(source, f"{key}.{stem}_file", f"a readable file ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(source, f"{key}.{stem}_file", "a UTF-8 text file") from None
    return None


def _auth(spec: object, source: str, key: str, env: dict[str, str]) -> AuthConfig:
    if spec is None:
        return AuthConfig()
    _expect(isinstance(spec, dict), source, key, "a mapping")
    _known(spec, AUTH_KEYS, source, key, also=("api_key", "secret_key", "client_secret"))
    scheme = spec.get("scheme", "bearer")
    _expect(scheme in SCHEMES, source, f"{key}.scheme", " | ".join(SCHEMES))
    api_key = _read_secret(spec, "api_key", source, key, env)
    secret_key = _read_secret(spec, "secret_key", source, key, env)
    client_secret = _read_secret(spec, "client_secret", source, key, env)
    if scheme == "bearer":
        _expect(api_key is not None, source, f"{key}.api_key_env", "api_key_env or api_key_file for bearer auth")
    if scheme == "hmac":
        _expect(api_key is not None and secret_key is not None, source, key,
                "api_key_(env|file) and secret_key_(env|file) for hmac auth")
    token_url = None
    if scheme == "oauth2":
        token_url = _url(spec.get("token_url"), source, f"{key}.token_url")
        _expect(isinstance(spec.get("client_id"), str), source, f"{key}.client_id", "a string")
        _expect(client_secret is not None, source, f"{key}.client_secret_env", "client_secret_env or client_secret_file")
    return AuthConfig(scheme=scheme, api_key=api_key, secret_key=secret_key, token_url=token_url,
                      client_id=spec.get("client_id"), client_secret=client_secret, scope=spec.get("scope"))


def _target(spec: object, i: int, source: str, env: dict[str, str]) -> Target:
    key = f"targets[{i}]"
    _expect(isinstance(spec, dict), source, key, "a mapping")
    _known(spec, TARGET_KEYS, source, key)
    name = spec.get("name")
    _expect(isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum(), source,
            f"{key}.name", "a name of letters, digits, - and _")
    kind = spec.get("kind", "private")
    _expect(kind in KINDS, source, f"{key}.kind", " | ".join(KINDS))
    models = spec.get("models", ["deepseek-chat"])
    _expect(isinstance(models, list) and models and all(isinstance(m, str) for m in models), source,
            f"{key}.models", "a non-empty list of model names")
    quota = spec.get("daily_quota_requests")
    _expect(quota is None or _positive_int(quota), source, f"{key}.daily_quota_requests",
            "a positive integer")
    timeout = spec.get("timeout_s", 60.0)
    _expect(_positive(timeout), source, f"{key}.timeout_s", "a positive number")
    prices = None
    if spec.get("prices") is not None:
        try:
            prices = pricing.parse(spec["prices"], f"{key}.prices")
        except pricing.PricingError as exc:
            raise ConfigError(source, exc.key, exc.expected) from None
    return Target(name=name, base_url=_url(spec.get("base_url"), source, f"{key}.base_url"), kind=kind,
                  models=tuple(models), auth=_auth(spec.get("auth"), source, f"{key}.auth", env),
                  daily_quota_requests=quota, timeout_s=float(timeout), prices=prices)


def _probe(spec: object, source: str) -> ProbeConfig:
    if spec is None:
        return ProbeConfig()
    _expect(isinstance(spec, dict), source, "probe", "a mapping")
    _known(spec, PROBE_KEYS, source, "probe")
    d = ProbeConfig()
    interval = spec.get("interval_s", d.interval_s)
    _expect(_positive(interval), source, "probe.interval_s", "a positive number")
    max_tokens = spec.get("max_tokens", d.max_tokens)
    _expect(_positive_int(max_tokens), source, "probe.max_tokens", "a positive integer")
    prompt = spec.get("prompt", d.prompt)
    _expect(isinstance(prompt, str) and prompt, source, "probe.prompt", "a non-empty string")
    timeout = spec.get("timeout_s", d.timeout_s)
    _expect(_positive(timeout), source, "probe.timeout_s", "a positive number")
    model = spec.get("model")
    _expect(model is None or isinstance(model, str), source, "probe.model", "a model name")
    return ProbeConfig(float(interval), prompt, max_tokens, float(timeout), model)


def parse(data: object, source: str = "<config>", env: dict[str, str] | None = None) -> Config:
    """Build a Config from already-loaded YAML data."""
    env = dict(os.environ) if env is None else env
    if data is None:
        data = {}
    _expect(isinstance(data, dict), source, "", "a YAML mapping at the top level")
    unknown = set(data) - {"targets", "probe", "exporter", "slo", "loadtest"}
    _expect(not unknown, source, ", ".join(sorted(map(str, unknown))), "only targets, probe, exporter, slo, loadtest")
    targets = data.get("targets", [])
    _expect(isinstance(targets, list), source, "targets", "a list of targets")
    parsed = tuple(_target(t, i, source, env) for i, t in enumerate(targets))
    names = [t.name for t in parsed]
    _expect(len(names) == len(set(names)), source, "targets", "unique target names")
    return Config(targets=parsed, probe=_probe(data.get("probe"), source), source=source)


def _env_key_file(path: str) -> Secret:
    """The key in the file $OPSKIT_API_KEY_FILE names; an error names the variable and the file."""
    try:
        return Secret(_read_text(Path(path).expanduser()).strip())
    except OSError as exc:
        raise ConfigError(f"${ENV_API_KEY_FILE}", "", f"a readable key file ({path}: {exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"${ENV_API_KEY_FILE}", "", f"a UTF-8 text key file ({path})") from None


def load(path: str | os.PathLike[str] | None = None, target_url: str | None = None,
         env: dict[str, str] | None = None) -> Config:
    """Load the config file (if any), then apply $OPSKIT_TARGET_URL / $OPSKIT_API_KEY and flags.

    With no file, a single target named `default` comes from `target_url` or $OPSKIT_TARGET_URL,
    authenticated with $OPSKIT_API_KEY (or the file named by $OPSKIT_API_KEY_FILE) when set.
    """
    env = dict(os.environ) if env is None else env
    if path is not None:
        p = Path(path)
        try:
            text = _read_text(p)
        except OSError as exc:
            raise ConfigError(str(p), "", f"a readable file ({exc.strerror})") from None
        except UnicodeDecodeError as exc:  # a binary file given by mistake (a key, an archive)
            raise ConfigError(str(p), "", f"a UTF-8 YAML text file (byte {exc.start} is not UTF-8)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else ""
            raise ConfigError(str(p), where, "valid YAML") from None
        cfg = parse(data, str(p), env)
    else:
        cfg = Config()
    url = target_url or env.get(ENV_TARGET_URL)
    if url and (target_url or not cfg.targets):
        source = "--target" if target_url else f"${ENV_TARGET_URL}"
        key = None
        if env.get(ENV_API_KEY):
            key = Secret(env[ENV_API_KEY].strip())
        elif env.get(ENV_API_KEY_FILE):
            key = _env_key_file(env[ENV_API_KEY_FILE])
        auth = AuthConfig(scheme="bearer", api_key=key) if key else AuthConfig()
        base = _url(url, source, "")
        kind = "private" if urlsplit(base).hostname in ("127.0.0.1", "localhost", "::1") else "hosted"
        models = cfg.targets[0].models if cfg.targets else ("deepseek-chat", "deepseek-reasoner")
        cfg = Config(targets=(Target(name="default", base_url=base, kind=kind, models=models, auth=auth),),
                     probe=cfg.probe, source=cfg.source)
    return cfg
