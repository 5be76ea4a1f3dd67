"""Recording rules and alerts, as data built from a `Thresholds`.

Every number and `for:` duration comes from opskit.core.thresholds; the burn-rate factors and windows
are the SRE workbook's multi-window, multi-burn-rate method (they define the method, not a
threshold). Recording rules follow `level:metric:operation` naming. LLM alerts are aggregated
`by (target)`; the ratio alerts (error rate, 429 share) also need `min_request_rate` of traffic, so
that a target called only by the canary probe cannot page on one failed call. GPU, probe and
exporter alerts keep the scraped `instance`/`job` labels so that Alertmanager can inhibit an
instance's alerts while its exporter is down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opskit.core import catalog
from opskit.core.thresholds import Thresholds
from opskit.opscode import engine_rules

REQ = catalog.LLM_REQUESTS.name
# Error types that spend the availability budget: the server or the path to it failed. 429s have
# their own alert, 4xx are the caller's fault, and a client hanging up is not the server's failure.
SLO_ERROR_TYPES = ("server_error", "timeout", "connection", "stream_broken")
SLO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# (severity, for, [(burn factor, long window, short window), ...]) from the SRE workbook, ch. 5.
BURN_FAST = ("critical", "2m", ((14.4, "1h", "5m"), (6.0, "6h", "30m")))
BURN_SLOW = ("ticket", "15m", ((3.0, "1d", "2h"), (1.0, "3d", "6h")))
DEFAULT_EXPORTER_JOB = ".*opskit.*"


@dataclass(frozen=True)
class Recording:
    """A recording rule; `labels` are added to what it records (several rules may then share a name)."""

    record: str
    expr: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Alert:
    """An alerting rule; `summary`/`description` are Prometheus templates."""

    name: str
    expr: str
    for_: str | None
    severity: str
    summary: str
    description: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    """A rule group: recordings and alerts evaluated together."""

    name: str
    rules: tuple[Recording | Alert, ...]


def num(x: float) -> str:
    """A float as PromQL/prose wants it: no float noise (14.4*0.01 -> 0.144), no trailing .0."""
    return f"{x:.6g}"


def seconds(x: float) -> str:
    """0.5 -> '500ms', 2.0 -> '2s' (as humanizeDuration would print them)."""
    return f"{num(x * 1000)}ms" if x < 1 else f"{num(x)}s"


def percent(x: float) -> str:
    """0.02 -> '2%'."""
    return f"{num(x * 100)}%"


def _ratio(selector: str, window: str) -> str:
    """Share of requests matching `selector` per target; 0 (not absent) when none match."""
    part = f"sum by (target) (rate({REQ}{{{selector}}}[{window}]))"
    whole = f"sum by (target) (rate({REQ}[{window}]))"
    return f"({part} or {whole} * 0) / {whole}"


def _quantile(q: float, metric: catalog.Metric, window: str = "5m", by: str = "target") -> str:
    return f"histogram_quantile({num(q)}, sum by ({by}, le) (rate({metric.name}_bucket[{window}])))"


def slo_record(window: str) -> str:
    """Recording-rule name of the SLO error ratio over `window`."""
    return f"target:opskit_llm_slo_errors:ratio_rate{window}"


TTFT_P95 = "target:opskit_llm_ttft_seconds:p95_5m"
DURATION_P90 = "target:opskit_llm_request_duration_seconds:p90_5m"
ERRORS_RATIO = "target:opskit_llm_errors:ratio_rate5m"
RATE_LIMITED_RATIO = "target:opskit_llm_ratelimited:ratio_rate5m"
REQUESTS_RATE = "target:opskit_llm_requests:rate5m"
# Projected daily spend: the last hour's spend rate over a whole day, per target and currency.
SPEND_PROJECTED = "target:opskit_llm_spend:projected_daily"


def _guarded(ratio_rule: str, above: float, t: Thresholds) -> str:
    """`ratio_rule > above`, only for targets with enough traffic for a ratio to mean something.

    The `and` keeps the ratio as the alert's value; a target under `min_request_rate` (a quiet
    one that only the canary probe calls) drops out, so one failed canary cannot page."""
    return f"{ratio_rule} > {num(above)} and on (target) {REQUESTS_RATE} > {num(t.min_request_rate)}"


# The budget of the alert's target, looked up when the notification is written (Prometheus' `query`).
_BUDGET_OF_TARGET = (f'{{{{ with printf "max by (target, currency) ({catalog.LLM_SPEND_BUDGET.name}{{target=%q,'
                     f'currency=%q}})" $labels.target $labels.currency | query }}}}{{{{ . | first | value | '
                     f'printf "%.2f" }}}}{{{{ end }}}}')


def recordings() -> tuple[Recording, ...]:
    """Every recording rule opskit defines (names usable by alerts and dashboards)."""
    slo = "|".join(SLO_ERROR_TYPES)
    return (
        Recording(REQUESTS_RATE, f"sum by (target) (rate({REQ}[5m]))"),
        Recording(ERRORS_RATIO, _ratio('error_type!=""', "5m")),
        Recording(RATE_LIMITED_RATIO, _ratio('code="429"', "5m")),
        Recording(TTFT_P95, _quantile(0.95, catalog.LLM_TTFT)),
        # Per stream ("true"/"false"): a streamed chat and a non-streamed batch call are different
        # latencies; mixing them makes either objective meaningless.
        Recording(DURATION_P90, _quantile(0.90, catalog.LLM_DURATION, by="target, stream")),
        *(Recording(slo_record(w), _ratio(f'error_type=~"{slo}"', w)) for w in SLO_WINDOWS),
        Recording(SPEND_PROJECTED, f"sum by (target, currency) (rate({catalog.LLM_SPEND.name}[1h])) * 86400"),
    )


def recording_names() -> set[str]:
    """Names of opskit's own recording rules (the GPU source mapping and the engine:* ones included)."""
    from opskit.opscode import gpu_rules  # it builds on this module's types

    return ({r.record for r in recordings()} | gpu_rules.recording_names()
            | {record for record, _ in engine_rules.recordings()})


def llm_alerts(t: Thresholds) -> tuple[Alert, ...]:
    """Latency, error, rate-limit and quota alerts, one per target."""
    on = "on target {{ $labels.target }}"
    return (
        Alert("LLMHighTimeToFirstToken", f"{TTFT_P95} > {num(t.ttft_p95_seconds)}", t.ttft_for, "warning",
              f"p95 time to first token is high {on}",
              f"p95 time to first token of successful streamed calls {on} is "
              f"{{{{ $value | humanizeDuration }}}}, above {seconds(t.ttft_p95_seconds)} for {t.ttft_for}."),
        Alert("LLMHighRequestLatency", f"{DURATION_P90} > {num(t.duration_p90_seconds)}", t.duration_for,
              "warning", f"p90 request duration is high {on} (stream={{{{ $labels.stream }}}})",
              f"p90 duration of successful {{{{ if eq $labels.stream \"true\" }}}}streamed"
              f"{{{{ else }}}}non-streamed{{{{ end }}}} calls {on} is {{{{ $value | humanizeDuration }}}}, "
              f"above {seconds(t.duration_p90_seconds)} for {t.duration_for}."),
        Alert("LLMHighErrorRate", _guarded(ERRORS_RATIO, t.error_ratio, t), t.error_for, "warning",
              f"Error rate is high {on}",
              f"{{{{ $value | humanizePercentage }}}} of requests {on} failed, above "
              f"{percent(t.error_ratio)} for {t.error_for}."),
        Alert("LLMErrorRateCritical", _guarded(ERRORS_RATIO, t.error_ratio_critical, t), t.error_critical_for,
              "critical", f"Error rate is critical {on}",
              f"{{{{ $value | humanizePercentage }}}} of requests {on} failed, above "
              f"{percent(t.error_ratio_critical)} for {t.error_critical_for}."),
        Alert("LLMRateLimited", _guarded(RATE_LIMITED_RATIO, t.rate_limited_ratio, t), t.rate_limited_for,
              "warning", f"Requests are rate limited (429) {on}",
              f"{{{{ $value | humanizePercentage }}}} of requests {on} were answered 429, above "
              f"{percent(t.rate_limited_ratio)} for {t.rate_limited_for}."),
        Alert("LLMQuotaNearlyExhausted",
              f"sum by (target) (increase({REQ}[24h])) / max by (target) "
              f"({catalog.LLM_QUOTA_LIMIT.name} > 0) > {num(t.quota_used_ratio)}",
              None, "warning", f"Daily request quota nearly used up {on}",
              f"{{{{ $value | humanizePercentage }}}} of the daily request quota {on} was used in the "
              f"last 24h, above {percent(t.quota_used_ratio)}."),
        # Only targets whose prices carry a daily budget have the budget series: no budget, no alert.
        Alert("LLMSpendBudgetBurn",
              f"{SPEND_PROJECTED} > on (target, currency) max by (target, currency) ({catalog.LLM_SPEND_BUDGET.name})",
              t.spend_for, "warning", f"Projected daily spend is over budget {on}",
              f"At the last hour's rate, target {{{{ $labels.target }}}} spends {{{{ $value | printf \"%.2f\" }}}} "
              f"{{{{ $labels.currency }}}} a day, above its daily budget of {_BUDGET_OF_TARGET} for {t.spend_for}."),
    )


def _burn(t: Thresholds, name: str, spec: tuple) -> Alert:
    severity, for_, pairs = spec
    budget = 1.0 - t.availability_slo
    expr = " or ".join(
        f"({slo_record(long)} > {num(f * budget)} and {slo_record(short)} > {num(f * budget)})"
        for f, long, short in pairs
    )
    speed = ", ".join(f"{num(f)}x over {long} and {short}" for f, long, short in pairs)
    return Alert(name, expr, for_, severity,
                 "Error budget of target {{ $labels.target }} is burning too fast",
                 f"The {percent(t.availability_slo)} availability SLO (30d) of target "
                 f"{{{{ $labels.target }}}} is burning its error budget at {speed} or more: "
                 f"{{{{ $value | humanizePercentage }}}} of requests fail server-side.",
                 {"slo": "availability"})


def slo_alerts(t: Thresholds) -> tuple[Alert, ...]:
    """Multi-window, multi-burn-rate alerts on the availability SLO."""
    return (_burn(t, "LLMErrorBudgetFastBurn", BURN_FAST), _burn(t, "LLMErrorBudgetSlowBurn", BURN_SLOW))


def instance_alerts(t: Thresholds, exporter_job: str = DEFAULT_EXPORTER_JOB) -> tuple[Alert, ...]:
    """Alerts on series of one exporter instance: probe, GPU, scrape health."""
    where = "{{ $labels.instance }}"
    gpu = f"GPU {{{{ $labels.gpu }}}} on {where}"
    used, total = catalog.GPU_MEMORY_USED.name, catalog.GPU_MEMORY_TOTAL.name
    return (
        Alert("LLMProbeFailing", f"{catalog.PROBE_SUCCESS.name} == 0", t.probe_failing_for, "critical",
              "Canary probe of target {{ $labels.target }} is failing",
              f"Every canary call from {where} to target {{{{ $labels.target }}}} failed for "
              f"{t.probe_failing_for}."),
        Alert("GPUHighUtilization", f"{catalog.GPU_UTILIZATION.name} > {num(t.gpu_utilization_ratio)}",
              t.gpu_utilization_for, "warning", f"{gpu} is saturated",
              f"{gpu} is {{{{ $value | humanizePercentage }}}} busy, above "
              f"{percent(t.gpu_utilization_ratio)} for {t.gpu_utilization_for}."),
        Alert("GPUMemoryNearlyFull", f"{used} / ({total} > 0) > {num(t.gpu_memory_ratio)}", t.gpu_memory_for,
              "warning", f"{gpu} memory is nearly full",
              f"{gpu} has {{{{ $value | humanizePercentage }}}} of its memory in use, above "
              f"{percent(t.gpu_memory_ratio)} for {t.gpu_memory_for}."),
        Alert("OpskitExporterDown", f'up{{job=~"{exporter_job}"}} == 0', t.exporter_down_for, "warning",
              f"opskit exporter {where} is down",
              f"Prometheus could not scrape the opskit exporter {where} (job {{{{ $labels.job }}}}) "
              f"for {t.exporter_down_for}; its LLM and GPU series are missing."),
        Alert("OpskitGPUMetricsMissing", f"{catalog.GPU_UP.name} == 0", t.gpu_missing_for, "warning",
              f"opskit exporter {where} cannot read its GPUs",
              f"NVML has not answered the opskit exporter {where} for {t.gpu_missing_for}; "
              f"GPU series are missing."),
    )


def groups(t: Thresholds, exporter_job: str = DEFAULT_EXPORTER_JOB, **gpu) -> tuple[Group, ...]:
    """All rule groups, in file order. `gpu` passes `source` and `dcgm_job` to opskit.opscode.gpu_rules."""
    from opskit.opscode import gpu_rules  # it builds on this module's types

    return (
        Group("opskit.llm.recording", recordings()),
        Group("opskit.llm.alerts", llm_alerts(t)),
        Group("opskit.slo.alerts", slo_alerts(t)),
        # Before the instance alerts, so that GPUHighUtilization reads this evaluation's mapped series.
        gpu_rules.recording_group(t, **gpu),
        Group("opskit.instance.alerts", instance_alerts(t, exporter_job)),
        gpu_rules.alert_group(t),
        # Model-server engines: vLLM/SGLang/TGI mapped onto engine:*, and their alerts.
        Group("opskit.engine.recording", tuple(Recording(r, e) for r, e in engine_rules.recordings())),
        Group("opskit.engine.alerts", engine_rules.alerts(t, Alert)),
    )


def all_alerts(t: Thresholds, exporter_job: str = DEFAULT_EXPORTER_JOB, **gpu) -> list[Alert]:
    """Every alert, flattened."""
    return [r for g in groups(t, exporter_job, **gpu) for r in g.rules if isinstance(r, Alert)]
