"""The "LLM engine" dashboard: what the model server itself reports (vLLM, SGLang, TGI).

Running and waiting requests, KV-cache usage, preemptions, prefix-cache hits, queue time, server-side
vs client-side TTFT, tokens/s and finish reasons, per scraped engine endpoint (`instance`). Each
query reads the three engines' own series joined with `or` (opskit.core.engine_catalog names them
and the versions followed); a quantity an engine does not export (TGI: KV usage, preemptions,
prefix cache, TTFT) simply has no line for it. Threshold lines are the engine alerts' thresholds.
"""

from __future__ import annotations

from grafanalib.core import Template

from opskit.core import catalog as c
from opskit.core import engine_catalog as ec
from opskit.core.thresholds import Thresholds
from opskit.opscode.engine_rules import DEFAULT_ENGINE_JOB
from opskit.opscode.panels import DATASOURCE, RATE, matchers, target, timeseries, variable
from opskit.opscode.panels import dashboard as make_dashboard

# cluster/namespace: All is `.*`, which also matches engines scraped without those labels.
SEL = matchers("cluster", "namespace", "instance")
BY = "instance"


def _sum(metrics, op: str = "sum") -> str:
    return " or ".join(f"{op} by ({BY}) ({m.name}{SEL})" for m in metrics)


def _rate(names) -> str:
    return " or ".join(f"sum by ({BY}) (rate({n}{SEL}[{RATE}]))" for n in names)


def _quantile(q: float, metrics, by: str = BY) -> str:
    return " or ".join(f"histogram_quantile({q:g}, sum by ({by}, le) (rate({m.name}_bucket{SEL}[{RATE}])))"
                       for m in metrics)


def load(t: Thresholds) -> list:
    """Running and waiting, KV cache, preemptions, prefix cache."""
    prefix = (f"sum by ({BY}) (rate({ec.VLLM_PREFIX_HITS.name}{SEL}[{RATE}])) / (sum by ({BY}) "
              f"(rate({ec.VLLM_PREFIX_QUERIES.name}{SEL}[{RATE}])) > 0) or sum by ({BY}) "
              f"(rate({ec.SGLANG_CACHED_TOKENS.name}{SEL}[{RATE}])) / (sum by ({BY}) "
              f"(rate({ec.SGLANG_PROMPT_TOKENS.name}{SEL}[{RATE}])) > 0)")
    return [
        timeseries("Running and waiting requests",
                   "Requests in the engine's running batch and in its waiting queue (preempted ones "
                   f"included). Line: the queue-backlog alert threshold ({t.engine_waiting_requests:g} "
                   f"waiting for {t.engine_queue_for}).", "short",
                   [target(_sum((ec.VLLM_RUNNING, ec.SGLANG_RUNNING, ec.TGI_BATCH_SIZE)), "{{instance}} running"),
                    target(_sum((ec.VLLM_WAITING, ec.SGLANG_QUEUE, ec.TGI_QUEUE_SIZE)), "{{instance}} waiting")],
                   (("red", t.engine_waiting_requests),)),
        timeseries("KV-cache usage", "Share of the KV cache in use (vLLM kv_cache_usage_perc, SGLang "
                   f"token_usage; TGI exports none). Line: the alert threshold ({t.engine_kv_cache_ratio:.0%} "
                   f"for {t.engine_kv_cache_for}).", "percentunit",
                   [target(_sum((ec.VLLM_KV_USAGE, ec.SGLANG_TOKEN_USAGE), "max"), "{{instance}}")],
                   (("red", t.engine_kv_cache_ratio),)),
        timeseries("Preemptions per second", f"Running requests pushed back to waiting (their KV cache "
                   f"dropped, to be recomputed) per second over {RATE}; SGLang calls them retractions.",
                   "short", [target(_rate((ec.VLLM_PREEMPTIONS.name, ec.SGLANG_RETRACTED_TOTAL.name)),
                                    "{{instance}}")]),
        timeseries("Prefix-cache hit ratio", f"Prompt tokens served from the prefix cache over prompt "
                   f"tokens queried, over {RATE}.", "percentunit", [target(prefix, "{{instance}}")]),
    ]


def latency(t: Thresholds) -> list:
    """Queue time, server vs client TTFT, inter-token latency."""
    client = (f"histogram_quantile(0.95, sum by (target, le) (rate({c.LLM_TTFT.name}_bucket"
              f"{matchers('target')}[{RATE}])))")
    return [
        timeseries("Queue time", f"p50/p95 time requests waited in the engine before running, over {RATE}.", "s",
                   [target(_quantile(q, (ec.VLLM_QUEUE, ec.SGLANG_QUEUE_TIME, ec.TGI_QUEUE_DURATION)),
                           f"p{q * 100:g} {{{{instance}}}}") for q in (0.5, 0.95)]),
        timeseries("Server-side vs client-side TTFT",
                   "p95 time to first token as the engine measures it (arrival at the engine) and as "
                   "opskit's metering proxy and probe see it per target: the gap is network, proxy and "
                   f"queueing in front of the engine. Line: the client TTFT alert threshold "
                   f"({t.ttft_p95_seconds:g} s).", "s",
                   [target(_quantile(0.95, (ec.VLLM_TTFT, ec.SGLANG_TTFT)), "server p95 {{instance}}"),
                    target(client, "client p95 {{target}}")], (("red", t.ttft_p95_seconds),)),
        timeseries("Inter-token latency", f"p95 gap between output tokens as the engine measures it, over "
                   f"{RATE} (TGI: mean time per token of each request).", "s",
                   [target(_quantile(0.95, (ec.VLLM_ITL, ec.SGLANG_ITL, ec.TGI_TPOT)), "p95 {{instance}}")]),
    ]


def throughput(t: Thresholds) -> list:
    """Tokens per second and finish reasons."""
    prompt = _rate((ec.VLLM_PROMPT_TOKENS.name, ec.SGLANG_PROMPT_TOKENS.name, f"{ec.TGI_INPUT_LENGTH.name}_sum"))
    gen = _rate((ec.VLLM_GENERATION_TOKENS.name, ec.SGLANG_GENERATION_TOKENS.name,
                 f"{ec.TGI_GENERATED_TOKENS.name}_sum"))
    reasons = (f"sum by ({BY}, finished_reason) (rate({ec.VLLM_REQUEST_SUCCESS.name}{SEL}[{RATE}])) or "
               f'label_replace(sum by ({BY}) (rate({ec.SGLANG_ABORTED.name}{SEL}[{RATE}])), "finished_reason", '
               f'"abort", "", "") or label_replace(sum by ({BY}) (rate({ec.SGLANG_REQUESTS.name}{SEL}[{RATE}])), '
               f'"finished_reason", "finished", "", "") or label_replace(sum by ({BY}) '
               f'(rate({ec.TGI_REQUEST_SUCCESS.name}{SEL}[{RATE}])), "finished_reason", "finished", "", "")')
    return [
        timeseries("Tokens per second", "Prompt (prefill) and generated tokens per second the engine "
                   "processed.", "suffix: tok/s",
                   [target(prompt, "{{instance}} prompt"), target(gen, "{{instance}} generation")]),
        timeseries("Finished requests by reason", "Requests the engine finished per second by finish "
                   "reason: stop, length (max_tokens reached), abort (the client went away).", "reqps",
                   [target(reasons, "{{instance}} {{finished_reason}}")]),
    ]


def engine_variable(name: str = "instance", label: str = "Engine", narrowed_by: tuple[str, ...] = ()) -> Template:
    """A label of the scraped engine endpoints (any engine: its `up` series under the engines' job)."""
    narrow = "".join(f',{n}=~"${n}"' for n in narrowed_by)
    return Template(name=name, label=label, query=f'label_values(up{{job=~"{DEFAULT_ENGINE_JOB}"{narrow}}}, {name})',
                    dataSource=DATASOURCE, includeAll=True, multi=True, allValue=".*", default="$__all", refresh=2)


def build(t: Thresholds) -> object:
    """The LLM engine dashboard for thresholds `t`."""
    return make_dashboard(
        "LLM engine", "opskit-llm-engine",
        "What the model servers (vLLM, SGLang, TGI) report about themselves: queue, KV cache, "
        "preemptions, prefix cache, server-side latency and throughput. Generated by `opskit generate "
        "dashboards`; edit the code, not the JSON.",
        [engine_variable("cluster", "Cluster"), engine_variable("namespace", "Namespace", ("cluster",)),
         engine_variable(narrowed_by=("cluster", "namespace")), variable("target", "Target (client side)", c.LLM_REQUESTS)],
        [("Load and saturation", load(t)), ("Latency", latency(t)), ("Throughput", throughput(t))],
        alerts="LLMEngine.*",
    )


dashboard = build(Thresholds())  # grafanalib's generate-dashboard reads this; built-in values
