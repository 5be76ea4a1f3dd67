"""The "LLM API" dashboard: traffic, errors, latency, tokens, rate limits and probes per target/model.

Threshold lines are the alert thresholds (opskit.core.thresholds), passed in so a changed threshold moves
the line and the alert together. `dashboard` is the grafanalib convention for generate-dashboard.
"""

from __future__ import annotations

from grafanalib.core import DashboardLink

from opskit.core import catalog as c
from opskit.core.thresholds import Thresholds
from opskit.opscode.alert_rules import SLO_ERROR_TYPES
from opskit.opscode.panels import (
    RATE,
    gauge_panel,
    quantile_panel,
    rate_panel,
    scope_variables,
    scoped,
    source_variable,
    stat,
    target,
    timeseries,
    unit_of,
    variable,
)
from opskit.opscode.panels import (
    dashboard as make_dashboard,
)

REQ = c.LLM_REQUESTS.name


def sel(extra: str = "", source: bool = True, model: bool = True) -> str:
    """The selector of every panel: scope, exporter, source (for series that carry it), target, model."""
    return scoped("instance", *(("source",) if source else ()), "target", *(("model",) if model else ()),
                  extra=extra)


SEL = sel()
OUTPUT, OK = 'token_type="output"', 'error_type=""'


def _share(selector: str, window: str = RATE, source: bool = True) -> str:
    """Share of the selected requests among all, per target; 0 rather than absent when none match."""
    part = f"sum by (target) (rate({REQ}{sel(selector, source)}[{window}]))"
    whole = f"sum by (target) (rate({REQ}{sel(source=source)}[{window}]))"
    return f"({part} or {whole} * 0) / {whole}"


def glance(t: Thresholds) -> list:
    """The first row: availability against its SLO, error budget left, p95 TTFT, projected spend."""
    slo, budget = t.availability_slo, 1.0 - t.availability_slo
    server = f'error_type=~"{"|".join(SLO_ERROR_TYPES)}"'
    spend_sel = sel(source=False, model=False)
    return [
        stat("Availability vs SLO", f"Share of calls (proxy and probe, as the SLO alerts count them) without a "
             f"server-side error over the time range shown. Green at or above the {slo:.2%} SLO.", "percentunit",
             [target(f"1 - {_share(server, '$__range', source=False)}", "{{target}}")],
             [{"color": "red", "value": None}, {"color": "green", "value": slo}]),
        stat("Error budget left (30 d)", f"Share of the 30-day error budget ({budget:.2%} of calls may fail "
             f"server-side) not yet spent; below 0 the SLO is missed.", "percentunit",
             [target(f"1 - {_share(server, '30d', source=False)} / {budget:g}", "{{target}}")],
             [{"color": "red", "value": None}, {"color": "orange", "value": 0}, {"color": "green", "value": 0.25}]),
        stat("p95 time to first token", f"p95 TTFT of successful streamed calls of the selected source over {RATE} "
             f"(canary calls excluded by default). Red above the alert threshold ({t.ttft_p95_seconds:g} s).", "s",
             [target(f"histogram_quantile(0.95, sum by (target, le) (rate({c.LLM_TTFT.name}_bucket{SEL}[{RATE}])))",
                     "{{target}}")],
             [{"color": "green", "value": None}, {"color": "red", "value": t.ttft_p95_seconds}]),
        stat("Projected daily spend", "The last hour's spend rate over a day, and the daily budget configured "
             "with the target's prices (none: no spend alert). In the prices' currency.", "short",
             [target(f"sum by (target, currency) (rate({c.LLM_SPEND.name}{spend_sel}[1h])) * 86400",
                     "{{target}} {{currency}}"),
              target(f"max by (target, currency) ({c.LLM_SPEND_BUDGET.name}{spend_sel})",
                     "{{target}} budget {{currency}}")],
             [{"color": "blue", "value": None}]),
    ]


def _guard_note(t: Thresholds) -> str:
    """The ratio alerts' traffic guard in words (a quiet target's ratio is plotted, never alerted)."""
    return (f"; the alert needs at least {t.min_request_rate:g} calls/s ({t.min_request_rate * 60:g}/min) "
            f"on the target, so a target only the canary probe calls never alerts on its ratio.")


def traffic(t: Thresholds) -> list:
    """Request rate, error ratio and errors by type."""
    return [
        rate_panel(c.LLM_REQUESTS, "Request rate by status code", "target, code", SEL, "{{target}} {{code}}",
                   description="Calls per second by HTTP status (0 = transport failure), from the metering "
                               "proxy and the canary probe."),
        timeseries("Error ratio", f"Share of calls that failed (any error type) over {RATE}. Lines: the "
                   f"warning ({t.error_ratio:.0%}) and critical ({t.error_ratio_critical:.0%}) alert thresholds"
                   f"{_guard_note(t)}",
                   "percentunit", [target(_share('error_type!=""'), "{{target}}")],
                   (("orange", t.error_ratio), ("red", t.error_ratio_critical))),
        rate_panel(c.LLM_REQUESTS, "Errors by type", "target, error_type",
                   sel('error_type!=""'), "{{target}} {{error_type}}",
                   description="Failed calls per second by error type: rate_limited, client_error, "
                               "server_error, timeout, connection, stream_broken, client_disconnect."),
        gauge_panel(c.LLM_IN_FLIGHT, "Requests in flight", sel(model=False), "{{target}} {{source}} {{instance}}"),
    ]


def latency(t: Thresholds) -> list:
    """TTFT, duration and TPOT quantiles, of successful calls (TTFT and TPOT: streamed calls only)."""
    return [
        quantile_panel(c.LLM_TTFT, "Time to first token", (0.5, 0.95, 0.99), SEL, line=t.ttft_p95_seconds),
        # by stream: a streamed chat and a non-streamed call each have their own latency (DESIGN.md)
        quantile_panel(c.LLM_DURATION, "Request duration", (0.5, 0.9, 0.99), SEL, line=t.duration_p90_seconds,
                       by="target, model, stream"),
        quantile_panel(c.LLM_TPOT, "Time per output token", (0.5, 0.95), SEL),
        gauge_panel(c.PROBE_DURATION, "Probe duration", sel(source=False, model=False),
                    "{{target}} {{instance}}"),
    ]


def tokens(t: Thresholds) -> list:
    """Token throughput by type, and output tokens per request."""
    return [
        rate_panel(c.LLM_TOKENS, "Tokens per second, in and out", "target, model, token_type", SEL,
                   "{{target}} {{model}} {{token_type}}", unit="suffix: tok/s",
                   description="Tokens per second by type. cached_input is part of input and reasoning part "
                               "of output: do not stack them on top. " + c.LLM_TOKENS.help),
        timeseries("Output tokens per request", "Mean completion tokens per successful call: longer answers "
                   "explain longer durations at a normal time per output token.", "short",
                   [target(f"sum by (target, model) (rate({c.LLM_TOKENS.name}{sel(OUTPUT)}[{RATE}])) "
                           f"/ sum by (target, model) (rate({REQ}{sel(OK)}[{RATE}]))", "{{target}} {{model}}")]),
    ]


def spend(t: Thresholds) -> list:
    """Spend per hour per model, prompt-cache hit ratio and projected daily spend against the budget.
    Every source: canary calls cost money too."""
    tok, every = c.LLM_TOKENS.name, sel(source=False, model=False)
    cached, whole = sel('token_type="cached_input"'), sel('token_type="input"')
    cache = (f"sum by (target, model) (rate({tok}{cached}[{RATE}])) "
             f"/ sum by (target, model) (rate({tok}{whole}[{RATE}]))")
    return [
        timeseries("Spend per hour", "Estimated spend of the last hour per model, from usage and the target's "
                   "configured prices (none built in; off-peak discounts applied), canary calls included. "
                   + c.LLM_SPEND.help, "short",
                   [target(f"sum by (target, model, currency) (increase({c.LLM_SPEND.name}{sel(source=False)}[1h]))",
                           "{{target}} {{model}} {{currency}}")]),
        timeseries("Prompt cache hit ratio", "Share of input tokens served from the provider's prompt cache "
                   "(billed at the cached-input price): a drop means a changed prompt prefix.", "percentunit",
                   [target(cache, "{{target}} {{model}}")]),
        timeseries("Projected daily spend", "The last hour's spend rate over a whole day, per target, and the "
                   "daily budget configured with the target's prices (the LLMSpendBudgetBurn alert fires when the "
                   f"projection stays above it for {t.spend_for}; no budget line, no alert).", "short",
                   [target(f"sum by (target, currency) (rate({c.LLM_SPEND.name}{every}[1h])) * 86400",
                           "{{target}} {{currency}}"),
                    target(f"max by (target, currency) ({c.LLM_SPEND_BUDGET.name}{every})",
                           "{{target}} budget ({{currency}})")]),
    ]


def limits(t: Thresholds) -> list:
    """429s, rate-limit headroom (requests and tokens apart: their scales differ by orders of
    magnitude), quota and probe success."""
    every = sel(source=False, model=False)
    quota = (f"sum by (target) (increase({REQ}{every}[24h])) / max by (target) "
             f"({c.LLM_QUOTA_LIMIT.name}{every} > 0)")
    return [
        timeseries("429 share", f"Share of calls answered 429 (rate limited) over {RATE}. Line: the alert "
                   f"threshold ({t.rate_limited_ratio:.0%}){_guard_note(t)}", "percentunit",
                   [target(_share('code="429"'), "{{target}}")], (("red", t.rate_limited_ratio),)),
        timeseries("Rate-limit headroom: requests", "Last x-ratelimit-remaining-requests the target returned; "
                   "near zero means 429s are coming.", unit_of(c.LLM_RL_REQUESTS),
                   [target(f"min by (target) ({c.LLM_RL_REQUESTS.name}{sel(model=False)})", "{{target}} requests")]),
        timeseries("Rate-limit headroom: tokens", "Last x-ratelimit-remaining-tokens the target returned; "
                   "near zero means 429s are coming.", unit_of(c.LLM_RL_TOKENS),
                   [target(f"min by (target) ({c.LLM_RL_TOKENS.name}{sel(model=False)})", "{{target}} tokens")]),
        timeseries("Daily quota used", f"Calls in the last 24h over the configured daily quota. Line: the "
                   f"alert threshold ({t.quota_used_ratio:.0%}).", "percentunit",
                   [target(quota, "{{target}}")], (("red", t.quota_used_ratio),)),
        timeseries("Probe success", f"Share of canary probes that succeeded over {RATE}. "
                   + c.PROBE_SUCCESS.help, "percentunit",
                   [target(f"avg by (target, instance) (avg_over_time({c.PROBE_SUCCESS.name}"
                           f"{every}[{RATE}]))", "{{target}} {{instance}}")]),
    ]


def build(t: Thresholds) -> object:
    """The LLM API dashboard for thresholds `t`."""
    return make_dashboard(
        "LLM API", "opskit-llm-api",
        "Calls to OpenAI-compatible LLM APIs seen by opskit's metering proxy and canary probe, per target "
        "and model. Source: proxy (the application's calls, the default) or probe (canary calls). "
        "Generated by `opskit generate dashboards`; edit the code, not the JSON.",
        [*scope_variables(c.BUILD_INFO),
         variable("instance", "Exporter", c.BUILD_INFO, scoped()),
         source_variable(c.LLM_REQUESTS),
         variable("target", "Target", c.LLM_REQUESTS, scoped("instance")),
         variable("model", "Model", c.LLM_REQUESTS, scoped("instance", "target"))],
        [("At a glance", glance(t), (6, 5)), ("Traffic and errors", traffic(t)), ("Latency", latency(t)),
         ("Tokens", tokens(t)), ("Spend", spend(t)), ("Rate limits, quota and probes", limits(t))],
        # A private cluster: what the model server itself says (queue, KV cache, server-side TTFT).
        links=[DashboardLink(title="LLM engine", uri="/d/opskit-llm-engine", type="link", icon="dashboard",
                             keepTime=True, tooltip="Queue, KV cache and server-side latency of the model servers")],
        alerts="LLM.*|OpskitExporterDown",
    )


dashboard = build(Thresholds())  # grafanalib's generate-dashboard reads this; built-in values
