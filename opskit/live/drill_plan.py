"""The alert fire drill as data: which faults, which alerts each must fire (and which may fire with
it), how rules are compressed in time, and how one phase's observations become a verdict.

Pure code, no I/O; opskit.live.drill runs it against a live stack.

Time compression. Production rules use `for:` of minutes and rate windows of 5 minutes to 3 days.
The drill replaces every `for:` with a few seconds and maps every range window `[d]` to d/30,
clamped to 10-20 s, so an alert fires within seconds of its fault and resolves within about 20 s
of its clearing. The thresholds and expressions are otherwise exactly the rules'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

SHORT_FOR = "3s"
WINDOW_FACTOR, WINDOW_MIN_S, WINDOW_MAX_S = 30, 10, 20
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
# A range or subquery selector: `[5m]`, `[1h:1m]` (only the range part is compressed).
_RANGE = re.compile(r"\[((?:\d+(?:ms|s|m|h|d|w|y))+)(?=[\]:])")


def seconds(duration: str) -> float:
    """A Prometheus duration ('1h30m') in seconds."""
    parts = _PART.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def compress_window(duration: str) -> str:
    """A production range window scaled for the drill: d/30, clamped to 10-20 s."""
    s = min(max(seconds(duration) / WINDOW_FACTOR, WINDOW_MIN_S), WINDOW_MAX_S)
    return f"{round(s)}s"


# An `offset` (GPU XID rules: "a series that did not exist 10m ago") is a window too.
_OFFSET = re.compile(r"\boffset ((?:\d+(?:ms|s|m|h|d|w|y))+)")


def compress_expr(expr: str) -> str:
    """Every range window and offset in a PromQL expression compressed."""
    expr = _RANGE.sub(lambda m: "[" + compress_window(m.group(1)), expr)
    return _OFFSET.sub(lambda m: "offset " + compress_window(m.group(1)), expr)


def compress_rules(text: str, short_for: str = SHORT_FOR) -> str:
    """A rules file with every window compressed and every `for:` replaced by `short_for`."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
        raise ValueError("rules file: expected a mapping with a list of groups")
    for group in data["groups"]:
        group.pop("interval", None)  # evaluate at the stack's (1 s) global interval
        for rule in group.get("rules", []):
            rule["expr"] = compress_expr(str(rule["expr"]))
            if "for" in rule:
                rule["for"] = short_for
    return yaml.safe_dump(data, sort_keys=False, width=10_000)


def alert_severities(text: str) -> dict[str, str]:
    """Alert name -> its `severity` label, from a rules file."""
    data = yaml.safe_load(text) or {}
    return {r["alert"]: r.get("labels", {}).get("severity", "")
            for g in data.get("groups", []) for r in g.get("rules", []) if "alert" in r}


# One system prompt shared by every call (~100 tokens, as an application's would be): the mock's context
# cache serves its 64-token blocks again, so the cache-hit and spend panels have data like the rest.
SYSTEM = "You are the release assistant of an SRE team. " * 8
REQUEST_BODY = {"model": "deepseek-chat", "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": 16, "messages": [{"role": "system", "content": SYSTEM},
                                               {"role": "user", "content": "Say something short."}]}


@dataclass(frozen=True)
class Phase:
    """One injected fault. `required` alerts must fire, reach the receiver (or be inhibited there
    by a co-firing alert) and resolve; `allowed` ones may fire with them; any other firing alert
    fails the phase. `scope` are labels every notification of a required alert must carry.

    The fault: `mock` maps an admin section (faults, limits, latency) to the changes to PUT; the
    drill reads the section first and puts the old values back to clear it. `gpu` sets fake GPU
    fields (util in %, mem_used in bytes, power_mw "!" for a failing read, index 1 for a device
    count NVML cannot report). `stop_exporter` freezes the exporter (SIGSTOP), with the load paused.
    `body` changes the load's request body while the fault lasts (what the callers ask for).
    """

    name: str
    what: str
    mock: dict[str, dict] = field(default_factory=dict)
    gpu: dict | None = None
    stop_exporter: bool = False
    body: dict = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    allowed: frozenset[str] = frozenset()
    scope: dict[str, str] = field(default_factory=dict)
    hold_s: float = 0.0                # with no required alert: how long to watch for a false alarm
    scopes: dict[str, dict[str, str]] = field(default_factory=dict)  # per-alert scope, instead of `scope`

    @property
    def needs_gpu(self) -> bool:
        """True when the fault is injected through the fake GPU."""
        return self.gpu is not None


def restore(changes: dict, before: dict) -> dict:
    """The admin PUT that undoes `changes`, given the section as it was before them."""
    out = {k: before.get(k) for k in changes if k != "error_rate"}
    if "error_rate" in changes:  # a partial map: statuses not named keep their rate
        out["error_rate"] = {s: before.get("error_rate", {}).get(s, 0) for s in changes["error_rate"]}
    return out


_ERRORS = frozenset({"LLMHighErrorRate", "LLMErrorRateCritical"})
_BURN = frozenset({"LLMErrorBudgetFastBurn", "LLMErrorBudgetSlowBurn"})
_TARGET = {"target": "mock"}
_INSTANCE = {"job": "opskit"}
_ENGINE = {"job": "llm-engine"}
_ENGINE_SIDE = frozenset({"LLMEngineGPUIdleWhileQueued", "LLMHighTimeToFirstToken", "LLMHighRequestLatency",
                          "LLMProbeFailing"})
GIB = 1 << 30

# Spend. The stack's mock target is priced (opskit.live.stack.MOCK_PRICES) and the drill gives it a daily
# budget proportional to the load: SPEND_BUDGET_PER_RPS per call/s offered. Drill calls (~94 prompt
# tokens, ~61 of them cached, 16 output) project to ~1.0 USD a day per call/s (measured: 19.5 at 20/s,
# the canary's calls included); runaway answers of 256 tokens to ~6.5 (129 at 20/s). The budget sits at
# 3 per call/s, a factor of two or more from both.
SPEND_BUDGET_PER_RPS = 3.0
_LONG_ANSWERS = {"latency": {"output_tokens_mean": 256, "output_tokens_spread": 0, "itl_ms": 2.0,
                             "itl_jitter_ms": 0.0, "tokens_per_chunk": 16}}

PHASES: tuple[Phase, ...] = (
    # 5 % server errors: above the 2 % warning, far below the 15 % critical. A 5x burn of a 99 %
    # SLO trips the slow-burn pair; the fast-burn 6x leg (6 %) is within noise of 5 %, so it may.
    # 1 in 20 probes fails too: three in a row are unlikely but legitimate.
    Phase("errors", "5 % of calls answered 500", mock={"faults": {"error_rate": {"500": 0.05}}},
          required=frozenset({"LLMHighErrorRate", "LLMErrorBudgetSlowBurn"}),
          allowed=frozenset({"LLMErrorBudgetFastBurn", "LLMProbeFailing"}), scope=_TARGET),
    # +1 s before the first token: p95 TTFT passes 500 ms. Durations grow by the same second
    # (about 1.2 s here, under the 2 s p90 alert), which may legitimately alert on a slower box.
    Phase("ttft", "+1 s time to first token", mock={"faults": {"extra_ttft_ms": 1000}},
          required=frozenset({"LLMHighTimeToFirstToken"}), allowed=frozenset({"LLMHighRequestLatency"}),
          scope=_TARGET),
    # 200 ms between tokens: 16-token answers take over 3 s, past the 2 s p90; TTFT is unchanged.
    Phase("slow-stream", "200 ms between tokens", mock={"latency": {"itl_ms": 200.0, "itl_jitter_ms": 0.0}},
          required=frozenset({"LLMHighRequestLatency"}), scope=_TARGET),
    # A 429 storm: 5 requests per 1 s window against ~20/s offered. 429s are failures (error
    # ratio, critical above 15 %) but not the server's (no burn alert); the probe is throttled too.
    Phase("429-storm", "rate limit of 5 requests/s against ~20/s offered",
          mock={"limits": {"rpm": 5, "tpm": 10_000_000, "window_s": 1}},
          required=frozenset({"LLMRateLimited"}) | _ERRORS, allowed=frozenset({"LLMProbeFailing"}), scope=_TARGET),
    # The target fails every call, the probe's included: the probe alert fires, and so, rightly,
    # does every error and burn alert (the critical ones inhibit their warning twins).
    Phase("probe-failing", "every call (probe included) answered 503", mock={"faults": {"error_rate": {"503": 1.0}}},
          required=frozenset({"LLMProbeFailing"}) | _ERRORS | _BURN, scope=_TARGET),
    # A runaway caller: every answer 256 tokens (fast, 2 ms a token, so no latency alert) against the
    # budget the drill configured; projected daily spend goes ~3x over it.
    Phase("spend", "callers ask for long answers (256 tokens each)", mock=_LONG_ANSWERS, body={"max_tokens": 512},
          required=frozenset({"LLMSpendBudgetBurn"}), scope={**_TARGET, "currency": "USD"}),
    Phase("gpu-busy", "GPU 0 at 95 % utilization", gpu={"util": 95},
          required=frozenset({"GPUHighUtilization"}), scope={"gpu": "0", **_INSTANCE}),
    Phase("gpu-memory", "GPU 0 with 78 of 80 GiB in use", gpu={"mem_used": 78 * GIB},
          required=frozenset({"GPUMemoryNearlyFull"}), scope={"gpu": "0", **_INSTANCE}),
    # NVML answers but cannot count its devices: the exporter reports opskit_gpu_up 0.
    Phase("nvml-down", "NVML cannot report its devices", gpu={"index": 1},
          required=frozenset({"OpskitGPUMetricsMissing"}), scope=_INSTANCE),
    # A flaky power sensor: NVML errors are counted (a dashboard panel), yet no alert is due.
    Phase("nvml-field-error", "NVML power reads fail on GPU 0", gpu={"power_mw": "!"}, hold_s=6.0),
    # GPU health: a failing GPU pages (GPUHardwareErrors names what failed), a throttled
    # one warns, a pending row remap opens a ticket. Clearing the fault resets the GPU (ECC count 0).
    Phase("gpu-ecc", "an uncorrectable ECC error on GPU 0", gpu={"ecc_volatile": 1},
          required=frozenset({"GPUHardwareErrors"}), scope={"gpu": "0", "error": "uncorrectable_ecc", **_INSTANCE}),
    # XID 79: the GPU fell off the bus, delivered by NVML's event API to the exporter's XID thread.
    Phase("gpu-xid79", "GPU 0 reports XID 79 (fell off the bus)", gpu={"xids": (79,)},
          required=frozenset({"GPUHardwareErrors"}), scope={"gpu": "0", "error": "xid_79", "xid": "79", **_INSTANCE}),
    Phase("gpu-thermal", "GPU 0 clocks held down by hardware thermal slowdown", gpu={"clocks_event_reasons": 0x40},
          required=frozenset({"GPUThermalThrottling"}), scope={"gpu": "0", "reason": "thermal", **_INSTANCE}),
    Phase("gpu-power", "GPU 0 clocks held at its power cap", gpu={"clocks_event_reasons": 0x4},
          required=frozenset({"GPUPowerThrottling"}), scope={"gpu": "0", "reason": "power", **_INSTANCE}),
    Phase("gpu-row-remap", "GPU 0 has a row remap pending a reset", gpu={"remap_pending": 1},
          required=frozenset({"GPURowRemapPending"}), scope={"gpu": "0", **_INSTANCE}),
    # The mock plays vLLM and Prometheus scrapes its /metrics (job llm-engine). One slot for ~20
    # calls/s of 0.2 s: requests wait in the engine (and, rightly, for their first token; calls
    # that wait past the client's patience fail). The fake GPU is 20 % busy meanwhile, so the
    # "GPUs idle while requests wait" ticket may rightly open too.
    Phase("engine-queue", "the engine admits one request at a time", mock={"engine": {"capacity": 1}},
          required=frozenset({"LLMEngineQueueBacklog"}),
          allowed=_ENGINE_SIDE | _ERRORS | _BURN, scope=_ENGINE),
    # A KV cache of 330 tokens for calls of ~100 prompt tokens growing by 16, ~4 at a time: three are
    # admitted, their growth overflows it, and the newest running request is preempted again and
    # again. Usage swings as requests are pushed back, so KVCacheNearlyFull (> 90 % for its whole
    # `for:`) may or may not make it here.
    Phase("engine-kv", "the engine's KV cache shrunk to 330 tokens", mock={"engine": {"kv_capacity_tokens": 330}},
          required=frozenset({"LLMEnginePreempting"}),
          allowed=_ENGINE_SIDE | {"LLMEngineKVCacheNearlyFull", "LLMEngineQueueBacklog"} | _ERRORS | _BURN,
          scope=_ENGINE),
    Phase("engine-down", "the engine's /metrics answers 503", mock={"engine": {"metrics_up": False}},
          required=frozenset({"LLMEngineDown"}), scope=_ENGINE),
    # The exporter stops answering scrapes (frozen, so its port stays open and scrapes time out).
    Phase("exporter-down", "the exporter frozen (SIGSTOP)", stop_exporter=True,
          required=frozenset({"OpskitExporterDown"}), scope=_INSTANCE),
)
PHASE_NAMES = tuple(p.name for p in PHASES)


@dataclass
class Seen:
    """What the drill saw of one alert (by name) during one phase; times are Unix seconds."""

    pending_at: float | None = None
    firing_at: float | None = None
    delivered_at: float | None = None
    receiver: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    inhibited_at: float | None = None
    active: bool = False               # pending or firing at the last poll
    resolved_at: float | None = None   # a resolved notification after the fault was cleared
    inactive_at: float | None = None   # Prometheus stopped reporting it after the fault was cleared


def phase_misses(phase: Phase, seen: dict[str, Seen], severities: dict[str, str],
                 routes: dict[str, str] | None) -> list[str]:
    """Every way the phase failed, one line each; empty when it passed.

    `routes` maps severity -> receiver name (None: routing is not checked)."""
    misses = []
    for name in sorted(phase.required):
        s = seen.get(name)
        if name not in severities:
            misses.append(f"{name}: no such alert in the rules")
            continue
        if s is None or s.firing_at is None:
            state = "was pending but never fired" if s and s.pending_at else "never went pending"
            misses.append(f"{name}: {state}")
            continue
        if s.delivered_at is None and s.inhibited_at is None:
            misses.append(f"{name}: fired but never reached the receiver")
        elif s.delivered_at is not None:
            misses.extend(_label_misses(name, s, phase.scopes.get(name, phase.scope), severities, routes))
        if s.inactive_at is None:
            misses.append(f"{name}: still active after the fault was cleared")
        elif s.delivered_at is not None and s.resolved_at is None:
            misses.append(f"{name}: resolved in Prometheus but no resolved notification arrived")
    for name, s in sorted(seen.items()):
        if s.firing_at is not None and name not in phase.required | phase.allowed:
            misses.append(f"{name}: fired, but {phase.name} should not fire it")
    return misses


def _label_misses(name: str, s: Seen, scope: dict[str, str], severities: dict[str, str],
                  routes: dict[str, str] | None) -> list[str]:
    want = {"alertname": name, "severity": severities[name], **scope}
    wrong = {k: s.labels.get(k) for k, v in want.items() if s.labels.get(k) != v}
    out = [f"{name}: notification labels {wrong} should be {({k: want[k] for k in wrong})}"] if wrong else []
    if routes is not None:
        expected = routes.get(severities[name])
        if expected and s.receiver != expected:
            out.append(f"{name}: routed to receiver {s.receiver!r}, expected {expected!r}")
    return out
