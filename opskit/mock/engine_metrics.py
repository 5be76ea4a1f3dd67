"""`opskit mock --engine vllm|sglang|tgi`: the engine's own `/metrics`, driven by the mock's state.

Families, types, labels, help texts and bucket edges come from opskit.core.engine_catalog (which
names the engine versions followed). Values come from engine_sim.EngineSim (running, waiting, KV
usage, preemptions, prefix cache) and from each finished request (timings, tokens, finish reason).

Server-side timings of one request, from its arrival at the mock:
  queue     arrival -> admitted to the KV cache (capacity slot and KV space)
  TTFT      arrival -> its first token is due (queue + sampled TTFT + any pause before it)
  prefill   admitted -> first token;  decode  first token -> finish;  inference  admitted -> finish
  e2e       arrival -> finish
Inter-token latency: a request with g tokens adds g-1 observations of its mean gap (decode / (g-1)),
the way SGLang records a multi-token step; the mean is exact, the spread within a request is lost.
A request whose client went away, or whose stream was cut, finishes as `abort`.

Exposition: prometheus_client's text format (0.0.4) for vLLM and SGLang: families under their sample
name (`vllm:num_preemptions_total`), `_count` before `_sum`; the `_created` samples prometheus_client
adds are left out (no rule or panel reads them). TGI's Rust exporter: no labels, `_sum` before
`_count`, bucket edges in Rust's float format (`1` rather than `1.0`).
"""

from __future__ import annotations

import bisect
import time

from opskit.core import engine_catalog as ec
from opskit.core.catalog import HISTOGRAM, Metric
from opskit.mock.engine_sim import EngineSim, Seq, generated

# Which finished-request quantity feeds each histogram family.
HIST_SOURCE = {
    ec.VLLM_TTFT: "ttft", ec.VLLM_ITL: "itl", ec.VLLM_TPOT: "itl", ec.VLLM_E2E: "e2e", ec.VLLM_QUEUE: "queue",
    ec.VLLM_INFERENCE: "inference", ec.VLLM_PREFILL: "prefill", ec.VLLM_DECODE: "decode",
    ec.VLLM_REQUEST_PROMPT_TOKENS: "prompt_len", ec.VLLM_REQUEST_GENERATION_TOKENS: "gen_len",
    ec.VLLM_REQUEST_PARAMS_N: "n", ec.VLLM_REQUEST_PARAMS_MAX_TOKENS: "max_tokens",
    ec.SGLANG_TTFT: "ttft", ec.SGLANG_ITL: "itl", ec.SGLANG_E2E: "e2e", ec.SGLANG_QUEUE_TIME: "queue",
    ec.SGLANG_RETRACTIONS: "retractions",
    ec.TGI_REQUEST_DURATION: "e2e", ec.TGI_QUEUE_DURATION: "queue", ec.TGI_INFERENCE_DURATION: "inference",
    ec.TGI_TPOT: "tpot", ec.TGI_INPUT_LENGTH: "prompt_len", ec.TGI_GENERATED_TOKENS: "gen_len",
}


class Hist:
    """One histogram's bucket counts (non-cumulative) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value`."""
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.sum += value * count


def _go_float(x: float) -> str:
    """A float as prometheus_client writes it (Go's strconv style: 1.0, 0.001, +Inf)."""
    return "+Inf" if x == float("inf") else repr(float(x))


def _rust_float(x: float) -> str:
    """A float as TGI's Rust exporter writes it: no trailing `.0` on whole numbers."""
    if x == float("inf"):
        return "+Inf"
    r = repr(float(x))
    return r[:-2] if r.endswith(".0") else r


class EngineMetrics:
    """Counters and histograms of one engine flavour, and its text exposition."""

    def __init__(self, engine: str, sim: EngineSim, model: str, clock=time.perf_counter) -> None:
        self.engine, self.sim, self.clock = engine, sim, clock
        self.families = ec.BY_ENGINE[engine]
        self.static = {"model_name": model, "engine": "0", "engine_type": "unified", "tp_rank": "0",
                       "pp_rank": "0", "moe_ep_rank": "0"}
        self.hists: dict[str, list[Hist]] = {}
        self._hist_of: dict[str, Hist] = {}
        for m in self.families:
            if m.type == HISTOGRAM:
                h = Hist(m.buckets)
                self._hist_of[m.name] = h
                self.hists.setdefault(HIST_SOURCE[m], []).append(h)
        self.prompt_tokens = self.generation_tokens = self.requests = self.aborted = 0
        self.by_reason = dict.fromkeys(ec.VLLM_FINISH_REASONS, 0)
        self._last_gen, self._last_t = 0, clock()
        sim.observer = self

    def _observe(self, source: str, value: float, count: int = 1) -> None:
        for h in self.hists.get(source, ()):
            h.observe(value, count)

    def finished(self, seq: Seq, reason: str | None, n: int, max_tokens: int | None) -> None:
        """Record one request that left the engine; reason None = aborted (client gone, stream cut)."""
        now = self.clock()
        adm = seq.adm
        self.requests += 1
        self.prompt_tokens += seq.prompt
        self._observe("prompt_len", seq.prompt)
        self._observe("n", n)
        if max_tokens:
            self._observe("max_tokens", max_tokens)
        self._observe("e2e", now - seq.arrival)
        self._observe("retractions", seq.preemptions)
        if reason is None:
            self.aborted += 1
            reason = "abort"
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if adm is None or not seq.started:      # never admitted: it only queued
            return
        self._observe("queue", seq.started - seq.arrival)
        gen = adm.sched.output_tokens if reason != "abort" else generated(seq, now)
        self.generation_tokens += gen
        self._observe("gen_len", gen)
        self._observe("inference", now - seq.started)
        first = adm.admitted + adm.sched.ttft + seq.pre_first_pause
        if gen == 0 or first > now:
            return
        self._observe("ttft", first - seq.arrival)
        self._observe("prefill", first - seq.started)
        self._observe("decode", now - first)
        if gen > 1:
            self._observe("itl", (now - first) / (gen - 1), gen - 1)
            self._observe("tpot", (now - first) / (gen - 1))

    # --- exposition ----------------------------------------------------------------------------
    def _values(self, m: Metric) -> list[tuple[dict[str, str], float]]:
        sim = self.sim
        simple = {
            "vllm:num_requests_running": len(sim.running), "sglang:num_running_reqs": len(sim.running),
            "tgi_batch_current_size": len(sim.running),
            "vllm:num_requests_waiting": sim.waiting, "sglang:num_queue_reqs": sim.waiting,
            "tgi_queue_size": sim.waiting,
            "vllm:kv_cache_usage_perc": sim.usage, "sglang:token_usage": sim.usage,
            "sglang:num_used_tokens": sim.used, "tgi_batch_current_max_tokens": sim.used,
            "sglang:max_total_num_tokens": sim.kv_capacity,
            "vllm:prefix_cache_queries_total": sim.prefix_queries, "vllm:prefix_cache_hits_total": sim.prefix_hits,
            "sglang:cached_tokens_total": sim.prefix_hits,
            "sglang:cache_hit_rate": sim.prefix_hits / sim.prefix_queries if sim.prefix_queries else 0.0,
            "vllm:num_preemptions_total": sim.preemptions, "sglang:num_retracted_requests_total": sim.preemptions,
            "sglang:num_retracted_reqs": sum(1 for s in sim.kv_waiting if s.preemptions),
            "vllm:prompt_tokens_total": self.prompt_tokens, "sglang:prompt_tokens_total": self.prompt_tokens,
            "vllm:generation_tokens_total": self.generation_tokens,
            "sglang:generation_tokens_total": self.generation_tokens,
            "sglang:num_requests_total": self.requests - self.aborted, "sglang:num_aborted_requests_total": self.aborted,
            "tgi_request_count": self.requests, "tgi_request_success": self.requests - self.aborted,
            "sglang:gen_throughput": self._throughput(),
        }
        if m.name == "vllm:request_success_total":
            return [({"finished_reason": r}, v) for r, v in self.by_reason.items()]
        return [({}, simple[m.name])]

    def _throughput(self) -> float:
        now = self.clock()
        dt, dg = now - self._last_t, self.generation_tokens - self._last_gen
        self._last_t, self._last_gen = now, self.generation_tokens
        return dg / dt if dt > 0 else 0.0

    def render(self) -> bytes:
        """The engine's /metrics text."""
        self.sim.tick()
        rust = self.engine == ec.TGI
        fmt = _rust_float if rust else _go_float
        out: list[str] = []
        for m in self.families:
            base = {k: self.static[k] for k in m.labels if k in self.static}
            out.append(f"# HELP {m.name} {m.help}\n# TYPE {m.name} {m.type}\n")
            if m.type == HISTOGRAM:
                h = self._hist_of[m.name]
                acc = 0
                for bound, n in zip((*h.bounds, float("inf")), h.counts, strict=True):
                    acc += n
                    out.append(f"{m.name}_bucket{_labels({**base, 'le': fmt(bound)})} {fmt(acc)}\n")
                total, count = f"{m.name}_sum{_labels(base)} {fmt(h.sum)}\n", f"{m.name}_count{_labels(base)} {fmt(acc)}\n"
                out.append(total + count if rust else count + total)
                continue
            for extra, value in self._values(m):
                out.append(f"{m.name}{_labels({**base, **extra})} {fmt(value)}\n")
        return "".join(out).encode()


def _labels(d: dict[str, str]) -> str:
    if not d:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in d.items()) + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
