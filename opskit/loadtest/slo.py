"""Service level objectives for the release gate and their evaluation. Pure computation.

Defaults come from opskit.core.thresholds (the same values the alerts use, with $OPSKIT_THRESHOLDS
applied): p95 TTFT < 500 ms, p90 request duration < 2 s, error ratio < 2 %, an open-loop run achieving
95 % of its rate, a throttled target accepting its limit + 5 %. A YAML file (loadtests/slo.yaml)
overrides them per scenario, with the thresholds' own field names:

    defaults:   {ttft_p95_seconds: 0.5, duration_p90_seconds: 2.0, error_ratio: 0.02}
    scenarios:
      qps:        {achieved_rate_ratio: 0.95}
      throttling: {throttling_limit_tolerance: 0.05}
      conversation: {ttft_p95_seconds: 0.8}

`null` switches an objective off. The names of earlier releases (ttft_p95_s, duration_p90_s,
achieved_rate_ratio_min, limit_tolerance) are still read. In the throttling scenario 429s are
expected and are not errors; its own checks apply: the target accepts no more than its limit per
window, every 429 carries Retry-After, no 5xx, and the load really went above the limit (at least
one 429).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from opskit.core import thresholds
from opskit.core.config import ConfigError
from opskit.loadtest import results

KEYS = ("ttft_p95_seconds", "duration_p90_seconds", "error_ratio", "achieved_rate_ratio",
        "throttling_limit_tolerance")
ALIASES = {"ttft_p95_s": "ttft_p95_seconds", "duration_p90_s": "duration_p90_seconds",
           "achieved_rate_ratio_min": "achieved_rate_ratio", "limit_tolerance": "throttling_limit_tolerance"}


def defaults(t: thresholds.Thresholds | None = None) -> dict[str, float | None]:
    """The gate's objectives before any override: the shared thresholds (default: `thresholds.load()`)."""
    t = t or thresholds.load()
    return {k: getattr(t, k) for k in KEYS}


def _section(data: object, source: str, key: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, key, "a mapping of objective names to numbers")
    out = {}
    for k, v in data.items():
        name = ALIASES.get(k, k)
        if name not in KEYS:
            raise ConfigError(source, f"{key}.{k}", f"one of {', '.join(KEYS)}")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0 or v == float("inf")):
            raise ConfigError(source, f"{key}.{k}", "a non-negative number or null")
        out[name] = v
    return out


def load(path: str | Path | None) -> dict[str, dict]:
    """Objectives per scenario ("*" = defaults) from an override file; ConfigError when malformed."""
    table: dict[str, dict] = {"*": defaults()}
    if path is None:
        return table
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except OSError as exc:
        raise ConfigError(str(p), "", f"a readable YAML file ({exc.strerror or exc.__class__.__name__})") from None
    except yaml.YAMLError as exc:  # say where, as the targets config does
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(str(p), f"line {mark.line + 1}" if mark else "", "valid YAML") from None
    if not isinstance(data, dict) or set(data) - {"defaults", "scenarios"}:
        raise ConfigError(str(p), "", "a mapping with `defaults` and/or `scenarios`")
    table["*"].update(_section(data.get("defaults"), str(p), "defaults"))
    scenarios = data.get("scenarios") or {}
    if not isinstance(scenarios, dict):
        raise ConfigError(str(p), "scenarios", "a mapping of scenario names")
    for name, section in scenarios.items():
        table[str(name)] = _section(section, str(p), f"scenarios.{name}")
    return table


def for_scenario(table: dict[str, dict], scenario: str) -> dict[str, float | None]:
    """Defaults overlaid with the scenario's own values."""
    return {**table.get("*", defaults()), **table.get(scenario, {})}


@dataclass(frozen=True)
class Check:
    """One objective checked: `value op limit` must hold."""

    scenario: str
    name: str
    value: float | None
    op: str
    limit: float | None
    passed: bool
    note: str = ""


@dataclass
class Verdict:
    """All checks of a run, and the numbers behind them (per-scenario summaries)."""

    checks: list[Check] = field(default_factory=list)
    summaries: dict[str, dict] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when checks ran and every one passed."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def missed(self) -> list[Check]:
        """The checks that failed, in order."""
        return [c for c in self.checks if not c.passed]

    def extend(self, other: Verdict) -> Verdict:
        """Add another scenario's checks and summaries to this verdict."""
        self.checks += other.checks
        self.summaries.update(other.summaries)
        return self


def _check(scenario: str, name: str, value: float | None, op: str, limit: float | None, note: str = "") -> Check:
    if value is None:
        return Check(scenario, name, None, op, limit, False, note or "no data")
    ok = {"<": value < limit, "<=": value <= limit, ">=": value >= limit, "==": value == limit}[op]
    return Check(scenario, name, float(value), op, limit, bool(ok), note)


def check_summary(s: dict, objectives: dict[str, float | None]) -> list[Check]:
    """The checks for one scenario's summary (from results.summarize)."""
    sc, o = s["scenario"], objectives
    if not s["requests"]:
        return [Check(sc, "requests", 0, ">=", 1, False, "no request completed")]
    checks = []
    # A run without streaming (--no-stream) has no TTFT (DESIGN.md): its duration is checked instead.
    if o.get("ttft_p95_seconds") is not None and sc != "throttling" and s.get("streamed_ratio") != 0:
        checks.append(_check(sc, "ttft_p95", s["ttft_s"]["p95"], "<", o["ttft_p95_seconds"]))
    if o.get("duration_p90_seconds") is not None and sc != "throttling":
        checks.append(_check(sc, "duration_p90", s["duration_s"]["p90"], "<", o["duration_p90_seconds"]))
    if o.get("error_ratio") is not None:
        note = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items()))
        # the statuses behind them: "client_error: 40" alone does not say that the key was wrong (401)
        codes = [f"{k}: {v}" for k, v in s.get("status", {}).items()
                 if not k.startswith("2") and not (sc == "throttling" and k == "429")]
        if note and codes:
            note += f" (status {', '.join(codes)})"
        checks.append(_check(sc, "error_ratio", s["error_ratio"], "<", o["error_ratio"], note))
    if s.get("requested_rate") and o.get("achieved_rate_ratio") is not None:
        checks.append(_check(sc, "achieved_rate_ratio", s["achieved_rate"] / s["requested_rate"], ">=",
                             o["achieved_rate_ratio"], f"{s['achieved_rate']:.1f}/{s['requested_rate']:.1f} req/s"))
    if "throttling" in s:
        checks += _throttling_checks(sc, s["throttling"], o.get("throttling_limit_tolerance") or 0.0)
    return checks


def _throttling_checks(sc: str, t: dict, tolerance: float) -> list[Check]:
    limit = t.get("limit_requests")
    per_window = None if limit is None else float(limit) * (1 + tolerance)
    note = f"{t['max_accepted_in_window']} accepted in {t['window_s']:g}s, limit {limit:g}" if limit else ""
    if limit and t.get("limit_source") == "header":  # the header has no window: say where 60 s came from
        note += " (x-ratelimit-limit-requests; window: --limit-window-s)"
    return [
        _check(sc, "accepted_within_limit", t["max_accepted_in_window"] if limit else None, "<=", per_window,
               note if limit else "limit unknown: pass --limit-requests (or the target sends x-ratelimit-limit-requests)"),
        _check(sc, "retry_after_on_429", t["missing_retry_after"], "==", 0,
               f"{t['missing_retry_after']} of {t['rate_limited']} 429s lack Retry-After"),
        _check(sc, "no_5xx_when_throttled", t["server_errors"], "==", 0, f"{t['server_errors']} answers 5xx"),
        _check(sc, "throttled", t["rate_limited"], ">=", 1,
               f"{t['rate_limited']} 429s: the load {'went' if t['rate_limited'] else 'did not go'} above the limit"),
    ]


def evaluate(df: pd.DataFrame, objectives: dict[str, float | None] | None = None,
             meta: dict | None = None) -> Verdict:
    """Summarise one scenario's log rows and check them against its objectives."""
    summary = results.summarize(df, meta)
    checks = check_summary(summary, objectives or defaults())
    return Verdict(checks=checks, summaries={summary["scenario"]: summary})
