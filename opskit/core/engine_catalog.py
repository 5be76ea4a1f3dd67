"""The engine catalogue: series that model servers (vLLM, SGLang, TGI) export themselves.

opskit does not export these; Prometheus scrapes them from the engine's own `/metrics`, and the
recording rules (opskit.opscode.engine_rules) map the three engines onto one `engine:*` set. They
are catalogued so that rules and dashboards can only name series an engine really exports (the
no-drift tests), and so that `opskit mock --engine ...` serves exactly these names, types, labels
and bucket edges.

Followed versions (names, types, labels, buckets, help texts):
- vLLM 0.11.0, `vllm/v1/metrics/loggers.py` (PrometheusStatLogger, V1 engine). Labels `model_name`
  and `engine` (the engine-core index, "0" without data parallelism). Counters are prometheus_client
  counters: the exposition name carries `_total`. `vllm:time_per_output_token_seconds` is deprecated
  in 0.11 in favour of `vllm:inter_token_latency_seconds` but still exported.
- SGLang 0.5 (`python/sglang/srt/metrics/collector.py`, main at 00ae9c15): scheduler series carry
  `model_name, engine_type, tp_rank, pp_rank, moe_ep_rank`, tokenizer series `model_name`. SGLang
  calls preemption "retraction".
- TGI 3.3 (`router/src/server.rs`, `docs/source/reference/metrics.md`): the Rust `metrics` crate
  exporter; no labels, counters without a `_total` suffix, every `*_duration` histogram on 35
  geometric buckets (0.0001 x 1.5^k). TGI exports no KV-cache usage, preemption or prefix-cache
  series, and no server-side TTFT.
"""

from __future__ import annotations

from opskit.core.catalog import COUNTER, GAUGE, HISTOGRAM, Metric

VLLM, SGLANG, TGI = "vllm", "sglang", "tgi"
ENGINES = (VLLM, SGLANG, TGI)
VERSIONS = {VLLM: "0.11.0", SGLANG: "0.5.5", TGI: "3.3.6"}


def one_two_five(max_value: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 token-count buckets up to `max_value` (max_model_len)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** exp
            if v > max_value:
                return tuple(float(x) for x in out)
            out.append(v)
        exp += 1


def tgi_duration_buckets() -> tuple[float, ...]:
    """TGI's duration buckets: 0.0001 multiplied by 1.5, 35 times (computed as TGI does)."""
    out, v = [], 0.0001
    for _ in range(35):
        v *= 1.5
        out.append(v)
    return tuple(out)


def tgi_length_buckets(max_tokens: int) -> tuple[float, ...]:
    """TGI's token-count buckets: 100 equal steps up to `max_tokens`."""
    return tuple((max_tokens / 100.0) * (x + 1) for x in range(100))


# Model geometry the mock reports (vLLM's max_model_len, TGI's max input/total tokens).
MAX_MODEL_LEN = 8192
TGI_MAX_INPUT_TOKENS, TGI_MAX_TOTAL_TOKENS = 4095, 4096

# --- vLLM 0.11.0 -------------------------------------------------------------------------------
V_LABELS = ("model_name", "engine")
V_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
V_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
V_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                     240.0, 480.0, 960.0, 1920.0, 7680.0)
V_TOKENS_BUCKETS = one_two_five(MAX_MODEL_LEN)
VLLM_FINISH_REASONS = ("stop", "length", "abort")


def _v(name: str, type_: str, help_: str, buckets: tuple[float, ...] = (), extra: tuple[str, ...] = (),
       unit: str = "") -> Metric:
    return Metric(name, type_, unit, help_, V_LABELS + extra, buckets)


VLLM_RUNNING = _v("vllm:num_requests_running", GAUGE, "Number of requests in model execution batches.")
VLLM_WAITING = _v("vllm:num_requests_waiting", GAUGE, "Number of requests waiting to be processed.")
VLLM_KV_USAGE = _v("vllm:kv_cache_usage_perc", GAUGE, "KV-cache usage. 1 means 100 percent usage.", unit="ratio")
VLLM_PREFIX_QUERIES = _v("vllm:prefix_cache_queries_total", COUNTER,
                         "Prefix cache queries, in terms of number of queried tokens.")
VLLM_PREFIX_HITS = _v("vllm:prefix_cache_hits_total", COUNTER, "Prefix cache hits, in terms of number of cached tokens.")
VLLM_PREEMPTIONS = _v("vllm:num_preemptions_total", COUNTER, "Cumulative number of preemption from the engine.")
VLLM_PROMPT_TOKENS = _v("vllm:prompt_tokens_total", COUNTER, "Number of prefill tokens processed.")
VLLM_GENERATION_TOKENS = _v("vllm:generation_tokens_total", COUNTER, "Number of generation tokens processed.")
VLLM_REQUEST_SUCCESS = _v("vllm:request_success_total", COUNTER, "Count of successfully processed requests.",
                          extra=("finished_reason",))
VLLM_REQUEST_PROMPT_TOKENS = _v("vllm:request_prompt_tokens", HISTOGRAM, "Number of prefill tokens processed.",
                                V_TOKENS_BUCKETS)
VLLM_REQUEST_GENERATION_TOKENS = _v("vllm:request_generation_tokens", HISTOGRAM,
                                    "Number of generation tokens processed.", V_TOKENS_BUCKETS)
VLLM_REQUEST_PARAMS_N = _v("vllm:request_params_n", HISTOGRAM, "Histogram of the n request parameter.",
                           (1.0, 2.0, 5.0, 10.0, 20.0))
VLLM_REQUEST_PARAMS_MAX_TOKENS = _v("vllm:request_params_max_tokens", HISTOGRAM,
                                    "Histogram of the max_tokens request parameter.", V_TOKENS_BUCKETS)
VLLM_TTFT = _v("vllm:time_to_first_token_seconds", HISTOGRAM, "Histogram of time to first token in seconds.",
               V_TTFT_BUCKETS, unit="seconds")
VLLM_TPOT = _v("vllm:time_per_output_token_seconds", HISTOGRAM,
               "Histogram of time per output token in seconds.DEPRECATED: Use vllm:inter_token_latency_seconds "
               "instead.", V_ITL_BUCKETS, unit="seconds")
VLLM_ITL = _v("vllm:inter_token_latency_seconds", HISTOGRAM, "Histogram of inter-token latency in seconds.",
              V_ITL_BUCKETS, unit="seconds")
VLLM_E2E = _v("vllm:e2e_request_latency_seconds", HISTOGRAM, "Histogram of e2e request latency in seconds.",
              V_LATENCY_BUCKETS, unit="seconds")
VLLM_QUEUE = _v("vllm:request_queue_time_seconds", HISTOGRAM, "Histogram of time spent in WAITING phase for request.",
                V_LATENCY_BUCKETS, unit="seconds")
VLLM_INFERENCE = _v("vllm:request_inference_time_seconds", HISTOGRAM,
                    "Histogram of time spent in RUNNING phase for request.", V_LATENCY_BUCKETS, unit="seconds")
VLLM_PREFILL = _v("vllm:request_prefill_time_seconds", HISTOGRAM,
                  "Histogram of time spent in PREFILL phase for request.", V_LATENCY_BUCKETS, unit="seconds")
VLLM_DECODE = _v("vllm:request_decode_time_seconds", HISTOGRAM,
                 "Histogram of time spent in DECODE phase for request.", V_LATENCY_BUCKETS, unit="seconds")

VLLM_METRICS = (VLLM_RUNNING, VLLM_WAITING, VLLM_KV_USAGE, VLLM_PREFIX_QUERIES, VLLM_PREFIX_HITS, VLLM_PREEMPTIONS,
                VLLM_PROMPT_TOKENS, VLLM_GENERATION_TOKENS, VLLM_REQUEST_SUCCESS, VLLM_REQUEST_PROMPT_TOKENS,
                VLLM_REQUEST_GENERATION_TOKENS, VLLM_REQUEST_PARAMS_N, VLLM_REQUEST_PARAMS_MAX_TOKENS, VLLM_TTFT,
                VLLM_TPOT, VLLM_ITL, VLLM_E2E, VLLM_QUEUE, VLLM_INFERENCE, VLLM_PREFILL, VLLM_DECODE)

# --- SGLang 0.5 --------------------------------------------------------------------------------
S_SCHED = ("model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank")
S_TOK = ("model_name",)
S_QUEUE_BUCKETS = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0,
                   80.0, 90.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0, 1000.0, 1200.0,
                   1400.0, 1600.0, 1800.0, 2000.0, 2500.0, 3000.0)
S_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0,
                  400.0)
S_E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0,
                 400.0, 600.0, 1200.0, 1800.0, 2400.0)
S_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
                 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000)
S_RETRACTIONS_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0,
                         75.0, 100.0)


def _s(name: str, type_: str, help_: str, labels: tuple[str, ...] = S_SCHED, buckets: tuple[float, ...] = (),
       unit: str = "") -> Metric:
    return Metric(name, type_, unit, help_, labels, buckets)


SGLANG_RUNNING = _s("sglang:num_running_reqs", GAUGE, "The number of running requests.")
SGLANG_QUEUE = _s("sglang:num_queue_reqs", GAUGE, "The number of requests in the waiting queue.")
SGLANG_USED_TOKENS = _s("sglang:num_used_tokens", GAUGE, "The number of used tokens.")
SGLANG_TOKEN_USAGE = _s("sglang:token_usage", GAUGE, "The token usage.", unit="ratio")
SGLANG_MAX_TOKENS = _s("sglang:max_total_num_tokens", GAUGE, "Maximum total number of tokens in the KV cache pool.")
SGLANG_GEN_THROUGHPUT = _s("sglang:gen_throughput", GAUGE, "The generation throughput (token/s).")
SGLANG_CACHE_HIT_RATE = _s("sglang:cache_hit_rate", GAUGE, "The prefix cache hit rate.", unit="ratio")
SGLANG_RETRACTED = _s("sglang:num_retracted_reqs", GAUGE, "The number of retracted requests.")
SGLANG_RETRACTED_TOTAL = _s("sglang:num_retracted_requests_total", COUNTER, "Total number of retracted requests.")
SGLANG_QUEUE_TIME = _s("sglang:queue_time_seconds", HISTOGRAM, "Histogram of queueing time in seconds.",
                       buckets=S_QUEUE_BUCKETS, unit="seconds")
SGLANG_PROMPT_TOKENS = _s("sglang:prompt_tokens_total", COUNTER, "Number of prefill tokens processed.", S_TOK)
SGLANG_GENERATION_TOKENS = _s("sglang:generation_tokens_total", COUNTER, "Number of generation tokens processed.",
                              S_TOK)
SGLANG_CACHED_TOKENS = _s("sglang:cached_tokens_total", COUNTER, "Number of cached prompt tokens.", S_TOK)
SGLANG_REQUESTS = _s("sglang:num_requests_total", COUNTER, "Number of requests processed.", S_TOK)
SGLANG_ABORTED = _s("sglang:num_aborted_requests_total", COUNTER, "Number of requests aborted.", S_TOK)
SGLANG_TTFT = _s("sglang:time_to_first_token_seconds", HISTOGRAM, "Histogram of time to first token in seconds.",
                 S_TOK, S_TTFT_BUCKETS, "seconds")
SGLANG_ITL = _s("sglang:inter_token_latency_seconds", HISTOGRAM, "Histogram of inter-token latency in seconds.",
                S_TOK, S_ITL_BUCKETS, "seconds")
SGLANG_E2E = _s("sglang:e2e_request_latency_seconds", HISTOGRAM, "Histogram of End-to-end request latency in seconds",
                S_TOK, S_E2E_BUCKETS, "seconds")
SGLANG_RETRACTIONS = _s("sglang:num_retractions", HISTOGRAM, "Histogram of retraction counts per request.", S_TOK,
                        S_RETRACTIONS_BUCKETS)

SGLANG_METRICS = (SGLANG_RUNNING, SGLANG_QUEUE, SGLANG_USED_TOKENS, SGLANG_TOKEN_USAGE, SGLANG_MAX_TOKENS,
                  SGLANG_GEN_THROUGHPUT, SGLANG_CACHE_HIT_RATE, SGLANG_RETRACTED, SGLANG_RETRACTED_TOTAL,
                  SGLANG_QUEUE_TIME, SGLANG_PROMPT_TOKENS, SGLANG_GENERATION_TOKENS, SGLANG_CACHED_TOKENS,
                  SGLANG_REQUESTS, SGLANG_ABORTED, SGLANG_TTFT, SGLANG_ITL, SGLANG_E2E, SGLANG_RETRACTIONS)

# --- TGI 3.3 -----------------------------------------------------------------------------------
T_DURATION = tgi_duration_buckets()


def _t(name: str, type_: str, help_: str, buckets: tuple[float, ...] = (), unit: str = "") -> Metric:
    return Metric(name, type_, unit, help_, (), buckets)


TGI_QUEUE_SIZE = _t("tgi_queue_size", GAUGE, "Current queue size")
TGI_BATCH_SIZE = _t("tgi_batch_current_size", GAUGE, "Current batch size")
TGI_BATCH_MAX_TOKENS = _t("tgi_batch_current_max_tokens", GAUGE, "Maximum tokens for the current batch")
TGI_REQUEST_COUNT = _t("tgi_request_count", COUNTER, "Total number of requests")
TGI_REQUEST_SUCCESS = _t("tgi_request_success", COUNTER, "Number of successful requests")
TGI_REQUEST_DURATION = _t("tgi_request_duration", HISTOGRAM, "Total time spent processing the request (e2e latency)",
                          T_DURATION, "seconds")
TGI_QUEUE_DURATION = _t("tgi_request_queue_duration", HISTOGRAM, "Time spent in the queue per request", T_DURATION,
                        "seconds")
TGI_INFERENCE_DURATION = _t("tgi_request_inference_duration", HISTOGRAM, "Request inference duration", T_DURATION,
                            "seconds")
TGI_TPOT = _t("tgi_request_mean_time_per_token_duration", HISTOGRAM,
              "Mean time per token per request (inter-token latency)", T_DURATION, "seconds")
TGI_INPUT_LENGTH = _t("tgi_request_input_length", HISTOGRAM, "Input token length per request",
                      tgi_length_buckets(TGI_MAX_INPUT_TOKENS))
TGI_GENERATED_TOKENS = _t("tgi_request_generated_tokens", HISTOGRAM, "Generated tokens per request",
                          tgi_length_buckets(TGI_MAX_TOTAL_TOKENS))

TGI_METRICS = (TGI_QUEUE_SIZE, TGI_BATCH_SIZE, TGI_BATCH_MAX_TOKENS, TGI_REQUEST_COUNT, TGI_REQUEST_SUCCESS,
               TGI_REQUEST_DURATION, TGI_QUEUE_DURATION, TGI_INFERENCE_DURATION, TGI_TPOT, TGI_INPUT_LENGTH,
               TGI_GENERATED_TOKENS)

BY_ENGINE: dict[str, tuple[Metric, ...]] = {VLLM: VLLM_METRICS, SGLANG: SGLANG_METRICS, TGI: TGI_METRICS}
ALL: tuple[Metric, ...] = VLLM_METRICS + SGLANG_METRICS + TGI_METRICS


def all_series() -> set[str]:
    """Every sample name the three engines export (of the catalogued families)."""
    return {s for m in ALL for s in m.series}
