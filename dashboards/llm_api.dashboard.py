"""The "LLM API" dashboard: traffic, errors, latency, tokens, rate limits and probes per target/model.

Threshold lines are the alert thresholds (opskit.core.thresholds), passed in so a changed threshold moves
the line and the alert together. `dashboard` is the grafanalib convention for generate-dashboard.
"""

from __future__ import annotations

from grafanalib.core import DashboardLink

from opskit.core import catalog as c
from opskit.core.thresholds import Thresholds
from opskit.opscode.panels import (
    RATE,
    gauge_panel,
    matchers,
    quantile_panel,
    rate_panel,
    target,
    timeseries,
    unit_of,
    variable,
)
from opskit.opscode.panels import (
    dashboard as make_dashboard,
)

SEL = matchers("target", "model")
REQ = c.LLM_REQUESTS.name


def _share(selector: str) -> str:
    """Share of the selected requests among all, per target; 0 rather than absent when none match."""
    part = f'sum by (target) (rate({REQ}{{target=~"$target",model=~"$model",{selector}}}[{RATE}]))'
    whole = f"sum by (target) (rate({REQ}{SEL}[{RATE}]))"
    return f"({part} or {whole} * 0) / {whole}"


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
                   matchers("target", "model", extra='error_type!=""'), "{{target}} {{error_type}}",
                   description="Failed calls per second by error type: rate_limited, client_error, "
                               "server_error, timeout, connection, stream_broken, client_disconnect."),
        gauge_panel(c.LLM_IN_FLIGHT, "Requests in flight", matchers("target"), "{{target}} {{source}} {{instance}}"),
    ]


def latency(t: Thresholds) -> list:
    """TTFT, duration and TPOT quantiles, of successful calls (TTFT and TPOT: streamed calls only)."""
    return [
        quantile_panel(c.LLM_TTFT, "Time to first token", (0.5, 0.95, 0.99), SEL, line=t.ttft_p95_seconds),
        # by stream: a streamed chat and a non-streamed call each have their own latency (DESIGN.md)
        quantile_panel(c.LLM_DURATION, "Request duration", (0.5, 0.9, 0.99), SEL, line=t.duration_p90_seconds,
                       by="target, model, stream"),
        quantile_panel(c.LLM_TPOT, "Time per output token", (0.5, 0.95), SEL),
        gauge_panel(c.PROBE_DURATION, "Probe duration", matchers("target", "instance"),
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
                   [target(f'sum by (target, model) (rate({c.LLM_TOKENS.name}{{target=~"$target",model=~"$model",'
                           f'token_type="output"}}[{RATE}])) / sum by (target, model) (rate({REQ}'
                           f'{{target=~"$target",model=~"$model",error_type=""}}[{RATE}]))', "{{target}} {{model}}")]),
    ]


def spend(t: Thresholds) -> list:
    """Spend per hour per model, prompt-cache hit ratio and projected daily spend against the budget."""
    tok = c.LLM_TOKENS.name
    cache = (f'sum by (target, model) (rate({tok}{{target=~"$target",model=~"$model",token_type="cached_input"}}'
             f'[{RATE}])) / sum by (target, model) (rate({tok}{{target=~"$target",model=~"$model",'
             f'token_type="input"}}[{RATE}]))')
    return [
        timeseries("Spend per hour", "Estimated spend of the last hour per model, from usage and the target's "
                   "configured prices (none built in; off-peak discounts applied). " + c.LLM_SPEND.help, "short",
                   [target(f"sum by (target, model, currency) (increase({c.LLM_SPEND.name}{SEL}[1h]))",
                           "{{target}} {{model}} {{currency}}")]),
        timeseries("Prompt cache hit ratio", "Share of input tokens served from the provider's prompt cache "
                   "(billed at the cached-input price): a drop means a changed prompt prefix.", "percentunit",
                   [target(cache, "{{target}} {{model}}")]),
        timeseries("Projected daily spend", "The last hour's spend rate over a whole day, per target, and the "
                   "daily budget configured with the target's prices (the LLMSpendBudgetBurn alert fires when the "
                   f"projection stays above it for {t.spend_for}; no budget line, no alert).", "short",
                   [target(f'sum by (target, currency) (rate({c.LLM_SPEND.name}{{target=~"$target"}}[1h])) * 86400',
                           "{{target}} {{currency}}"),
                    target(f'max by (target, currency) ({c.LLM_SPEND_BUDGET.name}{{target=~"$target"}})',
                           "{{target}} budget ({{currency}})")]),
    ]


def limits(t: Thresholds) -> list:
    """429s, rate-limit headroom, quota and probe success."""
    quota = (f'sum by (target) (increase({REQ}{{target=~"$target"}}[24h])) / max by (target) '
             f'({c.LLM_QUOTA_LIMIT.name}{{target=~"$target"}} > 0)')
    return [
        timeseries("429 share", f"Share of calls answered 429 (rate limited) over {RATE}. Line: the alert "
                   f"threshold ({t.rate_limited_ratio:.0%}){_guard_note(t)}", "percentunit",
                   [target(_share('code="429"'), "{{target}}")], (("red", t.rate_limited_ratio),)),
        timeseries("Rate-limit headroom", "Last x-ratelimit-remaining-requests and -tokens the target "
                   "returned; near zero means 429s are coming.", unit_of(c.LLM_RL_REQUESTS),
                   [target(f"min by (target) ({c.LLM_RL_REQUESTS.name}{matchers('target')})", "{{target}} requests"),
                    target(f"min by (target) ({c.LLM_RL_TOKENS.name}{matchers('target')})", "{{target}} tokens")]),
        timeseries("Daily quota used", f"Calls in the last 24h over the configured daily quota. Line: the "
                   f"alert threshold ({t.quota_used_ratio:.0%}).", "percentunit",
                   [target(quota, "{{target}}")], (("red", t.quota_used_ratio),)),
        timeseries("Probe success", f"Share of canary probes that succeeded over {RATE}. "
                   + c.PROBE_SUCCESS.help, "percentunit",
                   [target(f"avg by (target, instance) (avg_over_time({c.PROBE_SUCCESS.name}"
                           f"{matchers('target', 'instance')}[{RATE}]))", "{{target}} {{instance}}")]),
    ]


def build(t: Thresholds) -> object:
    """The LLM API dashboard for thresholds `t`."""
    return make_dashboard(
        "LLM API", "opskit-llm-api",
        "Calls to OpenAI-compatible LLM APIs seen by opskit's metering proxy and canary probe, per target "
        "and model. Generated by `opskit generate dashboards`; edit the code, not the JSON.",
        [variable("target", "Target", c.LLM_REQUESTS),
         variable("model", "Model", c.LLM_REQUESTS, '{target=~"$target"}'),
         variable("instance", "Exporter", c.BUILD_INFO)],
        [("Traffic and errors", traffic(t)), ("Latency", latency(t)), ("Tokens", tokens(t)), ("Spend", spend(t)),
         ("Rate limits, quota and probes", limits(t))],
        # A private cluster: what the model server itself says (queue, KV cache, server-side TTFT).
        links=[DashboardLink(title="LLM engine", uri="/d/opskit-llm-engine", type="link", icon="dashboard",
                             keepTime=True, tooltip="Queue, KV cache and server-side latency of the model servers")],
    )


dashboard = build(Thresholds())  # grafanalib's generate-dashboard reads this; built-in values
