"""The catalogue: every series opskit exports, with its type, unit, help, labels and buckets.

The exporter builds its metrics from these entries; the dashboards and alert rules may only name
series defined here (tests check it). Names follow Prometheus conventions: `opskit_` prefix, base
units, `_total` on counters, `_ratio` for 0-1 values.
"""

from __future__ import annotations

from dataclasses import dataclass

from opskit.core.thresholds import Thresholds

COUNTER, GAUGE, HISTOGRAM, INFO = "counter", "gauge", "histogram", "info"

# Bucket edges. Every default threshold (0.5 s TTFT, 2 s duration) sits exactly on an edge so that
# histogram_quantile() interpolation never blurs an alert; tests check this for the live thresholds.
# Each histogram child costs (edges + 3) series per (target, source, model[, stream]), so edges are
# spent where an SRE reads a quantile, and doubled (not added linearly) in the long tail.
TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04,   # loopback/LAN engines (the mock, a private vLLM) : a fast first token
    0.06, 0.08, 0.1, 0.15,     # prefill of short prompts on a hosted API, network included
    0.2, 0.25, 0.3, 0.4, 0.5,  # the interactive range up to the 500 ms TTFT threshold (an edge)
    0.75, 1.0, 1.5, 2.0, 2.5,  # long prompts, queueing; 2 s = the duration threshold, for the record
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,  # saturation: long queues, prefill of very long contexts
    160.0, 320.0, 640.0,       # reasoning models that think before any text (DeepSeek-R1/o1-class can
                               # take minutes; a non-reasoning TTFT there is an outage): doubled, 3 edges
)
DURATION_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25,  # tiny completions, canary probes (max_tokens 1-5), local engines
    0.5, 0.75, 1.0, 1.5, 2.0,      # short answers up to the 2 s duration threshold (an edge)
    2.5, 5.0, 7.5, 10.0, 15.0,     # typical chat answers (hundreds of tokens at 20-50 tok/s)
    20.0, 30.0, 60.0, 120.0, 300.0,  # long answers, batch and agent calls
    600.0, 1200.0, 1800.0,         # reasoning models' thinking + answer; 1800 s: DeepSeek closes a
                                   # request it has not answered in 30 min, so beyond it is +Inf
)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
PROBE_BUCKETS = DURATION_BUCKETS

GPU_LABELS = ("gpu", "uuid")
CALL_LABELS = ("target", "source", "model")
# `stream` on the duration histogram: "true" (SSE or WebSocket response) or "false" (one JSON body), so
# that streamed and non-streamed calls can each have their own latency objective. Two values only.
STREAM_VALUES = ("true", "false")
ERROR_TYPES = ("", "rate_limited", "client_error", "server_error", "timeout", "connection",
               "stream_broken", "client_disconnect")


@dataclass(frozen=True)
class Metric:
    """One exported series family. `name` is the family name as it appears in /metrics (for
    counters, including `_total`)."""

    name: str
    type: str
    unit: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def series(self) -> tuple[str, ...]:
        """Every sample name this family produces in the exposition format."""
        if self.type == HISTOGRAM:
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


def _m(*args, **kw) -> Metric:
    return Metric(*args, **kw)


GPU_UTILIZATION = _m("opskit_gpu_utilization_ratio", GAUGE, "ratio",
                     "GPU busy time over NVML's last sample period, 0-1.", GPU_LABELS)
GPU_MEMORY_USED = _m("opskit_gpu_memory_used_bytes", GAUGE, "bytes", "GPU memory in use.", GPU_LABELS)
GPU_MEMORY_TOTAL = _m("opskit_gpu_memory_total_bytes", GAUGE, "bytes", "GPU memory installed.", GPU_LABELS)
GPU_TEMPERATURE = _m("opskit_gpu_temperature_celsius", GAUGE, "celsius", "GPU core temperature.", GPU_LABELS)
GPU_POWER = _m("opskit_gpu_power_watts", GAUGE, "watts", "GPU power draw.", GPU_LABELS)
GPU_INFO = _m("opskit_gpu_info", GAUGE, "", "GPU identity; always 1. A MIG device (gpu 0:1) names its "
              "parent GPU's UUID in parent_uuid.", ("gpu", "uuid", "name", "driver_version", "parent_uuid"))
GPU_UP = _m("opskit_gpu_up", GAUGE, "", "1 when NVML answered at this scrape, else 0.")
GPU_COLLECT_ERRORS = _m("opskit_gpu_collect_errors_total", COUNTER, "",
                        "NVML errors while collecting, by reason.", ("reason",))

# --- GPU health (NVML): each is absent where the board or driver does not support it. ---
GPU_CLOCK = _m("opskit_gpu_clock_hertz", GAUGE, "hertz", "Current clock frequency, by clock (sm, memory).",
               GPU_LABELS + ("clock",))
GPU_ENERGY = _m("opskit_gpu_energy_joules_total", COUNTER, "joules",
                "Energy the GPU consumed since the driver loaded.", GPU_LABELS)
GPU_PCIE_REPLAYS = _m("opskit_gpu_pcie_replays_total", COUNTER, "",
                      "PCIe replays (link-level retransmissions) of the GPU.", GPU_LABELS)
GPU_ECC_UNCORRECTED = _m("opskit_gpu_ecc_uncorrected_errors_total", COUNTER, "",
                         "Uncorrectable ECC memory errors; scope volatile = since the driver loaded, "
                         "aggregate = over the GPU's life.", GPU_LABELS + ("scope",))
GPU_REMAPPED_ROWS = _m("opskit_gpu_remapped_rows", GAUGE, "",
                       "Memory rows remapped, by the error that caused it (correctable, uncorrectable).",
                       GPU_LABELS + ("cause",))
GPU_ROW_REMAP_PENDING = _m("opskit_gpu_row_remap_pending", GAUGE, "",
                           "1 when a row remap waits for the next GPU reset.", GPU_LABELS)
GPU_ROW_REMAP_FAILURE = _m("opskit_gpu_row_remap_failure", GAUGE, "",
                           "1 when a row remap failed (the GPU needs replacing).", GPU_LABELS)
GPU_THROTTLED = _m("opskit_gpu_clock_throttled", GAUGE, "",
                   "1 when the clocks are held down for this reason (thermal, power, hw_slowdown).",
                   GPU_LABELS + ("reason",))
GPU_XID_ERRORS = _m("opskit_gpu_xid_errors_total", COUNTER, "",
                    "XID errors the driver reported since the exporter started, by XID code.",
                    GPU_LABELS + ("xid",))
THROTTLE_REASONS = ("thermal", "power", "hw_slowdown")
GPU_HEALTH = (GPU_CLOCK, GPU_ENERGY, GPU_PCIE_REPLAYS, GPU_ECC_UNCORRECTED, GPU_REMAPPED_ROWS,
              GPU_ROW_REMAP_PENDING, GPU_ROW_REMAP_FAILURE, GPU_THROTTLED, GPU_XID_ERRORS)
# --- end GPU health ---

LLM_REQUESTS = _m("opskit_llm_requests_total", COUNTER, "",
                  "LLM API calls by HTTP status (0 = transport failure) and error type (empty = success).",
                  CALL_LABELS + ("code", "error_type"))
# Latency histograms observe successful calls only: failures are counted by type in LLM_REQUESTS, so a
# storm of fast 429s cannot pull a quantile down during an incident (DESIGN.md, OTel GenAI).
LLM_DURATION = _m("opskit_llm_request_duration_seconds", HISTOGRAM, "seconds",
                  "Request sent to last response byte, per successful call; stream=true|false tells "
                  "streamed from non-streamed calls.", CALL_LABELS + ("stream",), DURATION_BUCKETS)
LLM_TTFT = _m("opskit_llm_time_to_first_token_seconds", HISTOGRAM, "seconds",
              "Request sent to the first event carrying generated text (content or reasoning), per "
              "successful streamed call (a non-streamed call has no TTFT).", CALL_LABELS, TTFT_BUCKETS)
LLM_TPOT = _m("opskit_llm_time_per_output_token_seconds", HISTOGRAM, "seconds",
              "(duration - TTFT) / (output tokens - 1), per successful streamed call.", CALL_LABELS,
              TPOT_BUCKETS)
# token_type: input and output as billed; cached_input is the part of input served from the provider's
# prompt cache (DeepSeek prompt_cache_hit_tokens, OpenAI prompt_tokens_details.cached_tokens) and
# reasoning the part of output spent thinking (completion_tokens_details.reasoning_tokens): parts, so
# never add them to input/output. Parts are counted only from a usage that states them.
TOKEN_TYPES = ("input", "cached_input", "output", "reasoning")
LLM_TOKENS = _m("opskit_llm_tokens_total", COUNTER, "",
                "Tokens by type: input, cached_input (part of input), output, reasoning (part of output); "
                "from the server's usage, or else output counted as text chunks.",
                CALL_LABELS + ("token_type",))
# Spend in the currency of the target's configured prices (opskit.core.pricing): a label, since targets
# may bill in different currencies and nothing here converts them. Absent without prices.
LLM_SPEND = _m("opskit_llm_spend_total", COUNTER, "",
               "Estimated spend from usage and the target's configured prices per million tokens "
               "(off-peak discounts applied), in the currency label's units.", CALL_LABELS + ("currency",))
LLM_SPEND_BUDGET = _m("opskit_llm_spend_daily_budget", GAUGE, "",
                      "Configured daily spend budget of the target, in the currency label's units (absent when "
                      "none is configured: no spend alert then).", ("target", "currency"))
LLM_IN_FLIGHT = _m("opskit_llm_requests_in_flight", GAUGE, "", "Calls started and not yet finished.",
                   ("target", "source"))
LLM_RL_REQUESTS = _m("opskit_llm_ratelimit_remaining_requests", GAUGE, "",
                     "Last x-ratelimit-remaining-requests seen from the target.", ("target", "source"))
LLM_RL_TOKENS = _m("opskit_llm_ratelimit_remaining_tokens", GAUGE, "",
                   "Last x-ratelimit-remaining-tokens seen from the target.", ("target", "source"))
LLM_QUOTA_LIMIT = _m("opskit_llm_quota_limit_requests", GAUGE, "",
                     "Configured daily request quota of the target (absent when none is configured).",
                     ("target",))

PROBE_SUCCESS = _m("opskit_probe_success", GAUGE, "", "1 when the last canary call succeeded.", ("target",))
PROBE_DURATION = _m("opskit_probe_duration_seconds", GAUGE, "seconds",
                    "Duration of the last canary call.", ("target",))
BUILD_INFO = _m("opskit_build_info", GAUGE, "", "opskit build; always 1.", ("version",))
CONNECTIONS_REFUSED = _m("opskit_exporter_connections_refused_total", COUNTER, "",
                         "Client connections answered 503 and closed at accept: the listener (proxy or metrics) "
                         "was at its connection cap.", ("listener",))
CALL_LOG_RECORDS = _m("opskit_call_log_records_total", COUNTER, "",
                      "Call-log records written (with --call-log).")
CALL_LOG_DROPPED = _m("opskit_call_log_dropped_total", COUNTER, "",
                      "Call-log records lost, by reason: queue_full (the writer fell behind; the proxy never "
                      "waits for it) or write_error (disk full, directory gone).", ("reason",))

ALL: tuple[Metric, ...] = (
    GPU_UTILIZATION, GPU_MEMORY_USED, GPU_MEMORY_TOTAL, GPU_TEMPERATURE, GPU_POWER, GPU_INFO, GPU_UP,
    GPU_COLLECT_ERRORS, *GPU_HEALTH,
    LLM_REQUESTS, LLM_DURATION, LLM_TTFT, LLM_TPOT, LLM_TOKENS, LLM_SPEND, LLM_SPEND_BUDGET, LLM_IN_FLIGHT,
    LLM_RL_REQUESTS, LLM_RL_TOKENS, LLM_QUOTA_LIMIT, PROBE_SUCCESS, PROBE_DURATION, BUILD_INFO,
    CONNECTIONS_REFUSED, CALL_LOG_RECORDS, CALL_LOG_DROPPED,
)
BY_NAME: dict[str, Metric] = {m.name: m for m in ALL}


# --- dcgm-exporter's series, for the `dcgm` GPU source (opskit.opscode.gpu_rules maps them onto the
# GPU series above). Names, types and units exactly as in NVIDIA/dcgm-exporter's
# etc/default-counters.csv at release DCGM_EXPORTER_VERSION; `default` False = commented out there
# (a cluster must enable it in its own counters file, else the mapping records nothing).
DCGM_EXPORTER_VERSION = "4.5.3-4.8.2"
# Labels on every GPU series of that release; pod/namespace/container only with its Kubernetes
# mapping on. (Its main branch, after that release, renames Hostname to hostname.)
DCGM_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION",
               "pod", "namespace", "container")


@dataclass(frozen=True)
class DcgmField:
    """One dcgm-exporter series: Prometheus type, unit as its help text says, on by default."""

    name: str
    type: str
    unit: str
    default: bool = True


DCGM_FIELDS: dict[str, DcgmField] = {f.name: f for f in (
    DcgmField("DCGM_FI_DEV_GPU_UTIL", GAUGE, "percent"),
    DcgmField("DCGM_FI_DEV_FB_USED", GAUGE, "MiB"),
    DcgmField("DCGM_FI_DEV_FB_FREE", GAUGE, "MiB"),
    DcgmField("DCGM_FI_DEV_FB_RESERVED", GAUGE, "MiB"),
    DcgmField("DCGM_FI_DEV_GPU_TEMP", GAUGE, "celsius"),
    DcgmField("DCGM_FI_DEV_POWER_USAGE", GAUGE, "watts"),
    DcgmField("DCGM_FI_DEV_SM_CLOCK", GAUGE, "MHz"),
    DcgmField("DCGM_FI_DEV_MEM_CLOCK", GAUGE, "MHz"),
    DcgmField("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", COUNTER, "mJ"),
    DcgmField("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", COUNTER, ""),
    DcgmField("DCGM_FI_DEV_XID_ERRORS", GAUGE, "last XID code"),
    DcgmField("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", COUNTER, ""),
    DcgmField("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", COUNTER, ""),
    DcgmField("DCGM_FI_DEV_ROW_REMAP_FAILURE", GAUGE, "0/1"),
    DcgmField("DCGM_FI_PROF_GR_ENGINE_ACTIVE", GAUGE, "ratio"),
    DcgmField("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", COUNTER, "", default=False),
    DcgmField("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", COUNTER, "", default=False),
    DcgmField("DCGM_FI_DEV_POWER_VIOLATION", COUNTER, "ns", default=False),
    DcgmField("DCGM_FI_DEV_THERMAL_VIOLATION", COUNTER, "ns", default=False),
)}
# --- end dcgm-exporter ---


def all_series() -> set[str]:
    """Every sample name opskit can export or scrape from an engine (what rules and dashboards may
    reference), plus `up`."""
    names = {s for m in ALL for s in m.series}
    names.add("up")
    # Model-server series (vLLM, SGLang, TGI): scraped from the engine itself, catalogued apart.
    from opskit.core import engine_catalog

    names |= engine_catalog.all_series()
    return names


def threshold_edges(t: Thresholds) -> dict[str, tuple[float, tuple[float, ...]]]:
    """Thresholds that must sit on a histogram bucket edge, with the buckets they must sit in."""
    return {
        "ttft_p95_seconds": (t.ttft_p95_seconds, TTFT_BUCKETS),
        "duration_p90_seconds": (t.duration_p90_seconds, DURATION_BUCKETS),
    }


def cap_model(model: str | None, allowed: frozenset[str] | set[str]) -> str:
    """A model label bounded to the configured models; anything else is `other`."""
    if model and model in allowed:
        return model
    return "other"
