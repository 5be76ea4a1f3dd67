"""The mock's tunable settings: latency model, faults and limits, with one validator each.

The same validators serve the command-line flags and the admin API's partial updates (`PUT
/admin/...`), so a value that is refused on the command line is refused at runtime too, with the same
one-line message. Each `update()` validates every key first and changes nothing when one is bad.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

ERROR_STATUSES = (500, 502, 503)


class SettingsError(ValueError):
    """A bad setting; its message is one line naming the key and what was expected."""


def _number(key: str, value: object, lo: float = 0.0, hi: float | None = None) -> float:
    # finite only: an infinite TTFT or window would hang every request (json.loads reads Infinity too)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or (hi is not None and value > hi):
        span = f"between {lo:g} and {hi:g}" if hi is not None else f">= {lo:g}"
        raise SettingsError(f"{key}: expected a number {span}, got {value!r}")
    return float(value)


def _int(key: str, value: object, lo: int = 0, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        what = f"an integer >= {lo}" + (" or null" if allow_none else "")
        raise SettingsError(f"{key}: expected {what}, got {value!r}")
    return value


def positive_int(key: str, value: object) -> int:
    """An integer >= 1, or SettingsError naming `key`."""
    return _int(key, value, lo=1)


def check_keys(obj: object, allowed: set[str], what: str) -> dict:
    """The object as a dict when it is one with only `allowed` keys; else SettingsError."""
    return _check_keys(obj, allowed, what)


def _check_keys(obj: object, allowed: set[str], what: str) -> dict:
    if not isinstance(obj, dict):
        raise SettingsError(f"{what}: expected a JSON object")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise SettingsError(f"{what}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return obj


@dataclass
class Latency:
    """The latency model: TTFT, inter-token latency and output length, and the concurrency capacity."""

    ttft_ms: float = 50.0
    ttft_jitter_ms: float = 10.0
    itl_ms: float = 10.0
    itl_jitter_ms: float = 2.0
    output_tokens_mean: float = 64.0
    output_tokens_spread: float = 16.0
    tokens_per_chunk: int = 1
    capacity: int = 256

    def update(self, changes: object) -> None:
        """Validate then apply a partial update (admin API or flags)."""
        c = _check_keys(changes, set(asdict(self)), "latency")
        clean: dict[str, float | int | None] = {}
        for key, value in c.items():
            if key in ("tokens_per_chunk", "capacity"):
                clean[key] = _int(key, value, lo=1)
            elif key == "output_tokens_mean":
                clean[key] = _number(key, value, lo=1.0)
            else:
                clean[key] = _number(key, value)
        for key, value in clean.items():
            setattr(self, key, value)

    def to_json(self) -> dict:
        """The settings as the admin API shows them."""
        return asdict(self)


@dataclass
class Faults:
    """Injected faults: error rates by status, hangs, cut streams, malformed chunks, extra TTFT."""

    error_rate: dict[int, float] = field(default_factory=dict)
    hang_rate: float = 0.0
    cut_rate: float = 0.0
    malformed_rate: float = 0.0
    extra_ttft_ms: float = 0.0

    def update(self, changes: object) -> None:
        """Validate then apply a partial update; `error_rate` replaces the given statuses only."""
        c = _check_keys(changes, {"error_rate", "hang_rate", "cut_rate", "malformed_rate", "extra_ttft_ms"},
                        "faults")
        rates = dict(self.error_rate)
        if "error_rate" in c:
            rates.update(parse_error_rates(c["error_rate"]))
            rates = {s: r for s, r in rates.items() if r > 0}
            if sum(rates.values()) > 1.0:
                raise SettingsError("error_rate: the rates add up to more than 1")
        clean = {k: _number(k, v, 0.0, 1.0) for k, v in c.items() if k.endswith("_rate") and k != "error_rate"}
        if "extra_ttft_ms" in c:
            clean["extra_ttft_ms"] = _number("extra_ttft_ms", c["extra_ttft_ms"])
        self.error_rate = rates
        for key, value in clean.items():
            setattr(self, key, value)

    def to_json(self) -> dict:
        """The settings as the admin API shows them."""
        d = asdict(self)
        d["error_rate"] = {str(s): r for s, r in sorted(self.error_rate.items())}
        return d


def parse_error_rates(obj: object) -> dict[int, float]:
    """{"500": 0.05, ...} -> {500: 0.05}; only 500, 502 and 503 are injectable."""
    if not isinstance(obj, dict):
        raise SettingsError('error_rate: expected an object like {"500": 0.05}')
    out: dict[int, float] = {}
    for status, rate in obj.items():
        try:
            code = int(status)
        except (TypeError, ValueError):
            code = -1
        if code not in ERROR_STATUSES:
            raise SettingsError(f"error_rate: status {status!r} is not one of {', '.join(map(str, ERROR_STATUSES))}")
        out[code] = _number(f"error_rate[{code}]", rate, 0.0, 1.0)
    return out


@dataclass
class Limits:
    """Per-identity rate limits (requests and tokens per window) and a daily request quota; None = off."""

    rpm: int | None = None
    tpm: int | None = None
    daily_quota: int | None = None
    window_s: float = 60.0

    def update(self, changes: object) -> None:
        """Validate then apply a partial update."""
        c = _check_keys(changes, {"rpm", "tpm", "daily_quota", "window_s"}, "limits")
        clean: dict[str, float | int | None] = {}
        for key, value in c.items():
            if key == "window_s":
                clean[key] = _number(key, value, lo=0.001)
            else:
                clean[key] = _int(key, value, lo=1, allow_none=True)
        for key, value in clean.items():
            setattr(self, key, value)

    def to_json(self) -> dict:
        """The settings as the admin API shows them."""
        return asdict(self)
