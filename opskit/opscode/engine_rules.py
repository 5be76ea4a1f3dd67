"""Recording rules that map vLLM, SGLang and TGI onto one set of `engine:*` series, and the engine
alerts built on them.

Each recording is one expression per engine joined with `or` (a server exports one engine's names,
so the parts never overlap), aggregated `by (namespace, pod, job, instance)`: one series per scraped
model-server endpoint, with the pod labels that the Prometheus Operator adds, which join it to the
opskit exporter beside it (GPU utilisation). Names follow `level:metric:operation`.

What an engine does not export is absent for it rather than guessed: TGI 3.3 has no KV-cache usage,
preemption, prefix-cache or server-side TTFT series, so `engine:kv_cache_usage:ratio`,
`engine:preemptions:rate5m`, `engine:prefix_cache_hits:ratio_rate5m` and `engine:ttft_seconds:p95_5m`
have no TGI series and its KV and preemption alerts cannot fire (engine_catalog lists the versions).

On a model server a busy GPU is the goal, not a fault: the saturation signals are the queue, the KV
cache and preemptions. A GPU that idles while requests wait is a misconfiguration (too small a
batch or KV budget, a stuck scheduler): a ticket, not a page.
"""

from __future__ import annotations

from opskit.core import catalog
from opskit.core import engine_catalog as ec
from opskit.core.thresholds import Thresholds

BY = "namespace, pod, job, instance"
# Prometheus job of the engines' own /metrics (deploy/podmonitor.yaml: PodMonitor llm-engine).
DEFAULT_ENGINE_JOB = ".*llm-engine.*"

WAITING = "engine:requests_waiting:sum"
RUNNING = "engine:requests_running:sum"
KV_USAGE = "engine:kv_cache_usage:ratio"
PREEMPTIONS = "engine:preemptions:rate5m"
PREFIX_HITS = "engine:prefix_cache_hits:ratio_rate5m"
TTFT_P95 = "engine:ttft_seconds:p95_5m"
QUEUE_P95 = "engine:queue_time_seconds:p95_5m"
ITL_P95 = "engine:inter_token_latency_seconds:p95_5m"
E2E_P95 = "engine:e2e_request_latency_seconds:p95_5m"
PROMPT_TOKENS = "engine:prompt_tokens:rate5m"
GENERATION_TOKENS = "engine:generation_tokens:rate5m"
FINISHED = "engine:requests_finished:rate5m"


def _agg(op: str, metrics: tuple[catalog.Metric, ...]) -> str:
    return " or ".join(f"{op} by ({BY}) ({m.name})" for m in metrics)


def _rate(metrics: tuple[str, ...], by: str = BY) -> str:
    return " or ".join(f"sum by ({by}) (rate({m}[5m]))" for m in metrics)


def _ratio(part: str, whole: str) -> str:
    return f"sum by ({BY}) (rate({part}[5m])) / (sum by ({BY}) (rate({whole}[5m])) > 0)"


def _p95(metrics: tuple[catalog.Metric, ...]) -> str:
    return " or ".join(f"histogram_quantile(0.95, sum by ({BY}, le) (rate({m.name}_bucket[5m])))" for m in metrics)


def _reason(expr: str, reason: str) -> str:
    return f'label_replace({expr}, "finished_reason", "{reason}", "", "")'


def recordings() -> tuple[tuple[str, str], ...]:
    """(record, expr) of every engine recording rule."""
    s_done = f"sum by ({BY}) (rate({ec.SGLANG_REQUESTS.name}[5m]))"
    s_abort = f"sum by ({BY}) (rate({ec.SGLANG_ABORTED.name}[5m]))"
    t_ok = f"sum by ({BY}) (rate({ec.TGI_REQUEST_SUCCESS.name}[5m]))"
    t_all = f"sum by ({BY}) (rate({ec.TGI_REQUEST_COUNT.name}[5m]))"
    finished = " or ".join((
        f"sum by ({BY}, finished_reason) (rate({ec.VLLM_REQUEST_SUCCESS.name}[5m]))",
        _reason(s_done, "finished"), _reason(s_abort, "abort"),
        _reason(t_ok, "finished"), _reason(f"({t_all} - {t_ok})", "error"),
    ))
    return (
        (WAITING, _agg("sum", (ec.VLLM_WAITING, ec.SGLANG_QUEUE, ec.TGI_QUEUE_SIZE))),
        (RUNNING, _agg("sum", (ec.VLLM_RUNNING, ec.SGLANG_RUNNING, ec.TGI_BATCH_SIZE))),
        (KV_USAGE, _agg("max", (ec.VLLM_KV_USAGE, ec.SGLANG_TOKEN_USAGE))),
        (PREEMPTIONS, _rate((ec.VLLM_PREEMPTIONS.name, ec.SGLANG_RETRACTED_TOTAL.name))),
        (PREFIX_HITS, f"{_ratio(ec.VLLM_PREFIX_HITS.name, ec.VLLM_PREFIX_QUERIES.name)} or "
                      f"{_ratio(ec.SGLANG_CACHED_TOKENS.name, ec.SGLANG_PROMPT_TOKENS.name)}"),
        (TTFT_P95, _p95((ec.VLLM_TTFT, ec.SGLANG_TTFT))),
        (QUEUE_P95, _p95((ec.VLLM_QUEUE, ec.SGLANG_QUEUE_TIME, ec.TGI_QUEUE_DURATION))),
        (ITL_P95, _p95((ec.VLLM_ITL, ec.SGLANG_ITL, ec.TGI_TPOT))),
        (E2E_P95, _p95((ec.VLLM_E2E, ec.SGLANG_E2E, ec.TGI_REQUEST_DURATION))),
        (PROMPT_TOKENS, _rate((ec.VLLM_PROMPT_TOKENS.name, ec.SGLANG_PROMPT_TOKENS.name,
                               f"{ec.TGI_INPUT_LENGTH.name}_sum"))),
        (GENERATION_TOKENS, _rate((ec.VLLM_GENERATION_TOKENS.name, ec.SGLANG_GENERATION_TOKENS.name,
                                   f"{ec.TGI_GENERATED_TOKENS.name}_sum"))),
        (FINISHED, finished),
    )


def alerts(t: Thresholds, alert_cls, engine_job: str = DEFAULT_ENGINE_JOB) -> tuple:
    """The engine alerts (as opskit.opscode.alert_rules.Alert, passed in to avoid an import cycle)."""
    from opskit.opscode.alert_rules import num, percent

    where = "{{ $labels.instance }}"
    return (
        alert_cls("LLMEngineQueueBacklog", f"{WAITING} > {num(t.engine_waiting_requests)}", t.engine_queue_for,
                  "warning", f"Requests are queueing in the model server {where}",
                  f"{{{{ $value }}}} requests wait in the engine {where} (job {{{{ $labels.job }}}}), above "
                  f"{num(t.engine_waiting_requests)} for {t.engine_queue_for}: it is at capacity."),
        alert_cls("LLMEngineKVCacheNearlyFull", f"{KV_USAGE} > {num(t.engine_kv_cache_ratio)}", t.engine_kv_cache_for,
                  "warning", f"KV cache of the model server {where} is nearly full",
                  f"The engine {where} uses {{{{ $value | humanizePercentage }}}} of its KV cache, above "
                  f"{percent(t.engine_kv_cache_ratio)} for {t.engine_kv_cache_for}: new requests wait and "
                  f"running ones get preempted."),
        alert_cls("LLMEnginePreempting", f"{PREEMPTIONS} > {num(t.engine_preemptions_per_second)}",
                  t.engine_preempting_for, "warning", f"The model server {where} is preempting requests",
                  f"The engine {where} preempts {{{{ $value | printf \"%.2f\" }}}} requests/s (over 5m), above "
                  f"{num(t.engine_preemptions_per_second)}/s for {t.engine_preempting_for}: its KV cache "
                  f"overflows and preempted requests are recomputed."),
        alert_cls("LLMEngineDown", f'up{{job=~"{engine_job}"}} == 0', t.engine_down_for, "warning",
                  f"Model-server metrics {where} are down",
                  f"Prometheus could not scrape the engine's /metrics at {where} (job {{{{ $labels.job }}}}) "
                  f"for {t.engine_down_for}; its queue, KV-cache and latency series are missing."),
        alert_cls("LLMEngineGPUIdleWhileQueued",
                  f"{WAITING} > 0 and on (namespace, pod) (avg by (namespace, pod) "
                  f"({catalog.GPU_UTILIZATION.name}) < {num(t.engine_gpu_idle_ratio)})",
                  t.engine_gpu_idle_for, "ticket", f"GPUs idle while requests wait in {where}",
                  f"{{{{ $value }}}} requests wait in the engine {where} while its pod's GPUs are under "
                  f"{percent(t.engine_gpu_idle_ratio)} busy for {t.engine_gpu_idle_for}: a batch-size, "
                  f"KV-budget or scheduler misconfiguration."),
    )
