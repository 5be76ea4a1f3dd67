"""The mock's shared state: settings, latency model, capacity gate, limits, auth, counters, fault draws.

One event loop owns all of it, so nothing here locks. Counters are exact: every response of the API
listener is counted by status exactly once, when it is sent (a stream when its headers go out), and a
request that never gets a response (client went away, hang) is counted by what happened to it. The
one exception: bytes that are not HTTP at all are answered by aiohttp's parser (400) before any
handler runs, and are not counted.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
from dataclasses import dataclass, field

from opskit.mock.auth import ServerAuth
from opskit.mock.engine_sim import PrefixCache
from opskit.mock.latency_model import LatencyModel
from opskit.mock.limits import Gate, RateLimiter
from opskit.mock.settings import Faults, Latency, Limits, SettingsError, check_keys, positive_int

CONTEXT_CACHE_TOKENS = 64     # DeepSeek's context-cache unit
CONTEXT_CACHE_UNITS = 1 << 16  # units kept (LRU)

DEFAULT_MODELS = ("deepseek-chat", "deepseek-reasoner")
REASONING_MODELS = frozenset({"deepseek-reasoner"})


@dataclass
class Counters:
    """What the API listener did, for `GET /admin/counters` (reconciled against clients and proxies)."""

    requests: dict[str, int] = field(default_factory=dict)   # HTTP status -> responses
    by_path: dict[str, int] = field(default_factory=dict)    # route path -> responses
    ws: dict[str, int] = field(default_factory=dict)         # WebSocket requests by equivalent status
    input_tokens: int = 0
    output_tokens: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cut: int = 0
    malformed_chunks: int = 0
    client_disconnects: int = 0
    hangs: int = 0
    in_flight: int = 0
    introspection: dict[str, int] = field(default_factory=dict)   # /health, /metrics, ... (engine_routes)

    def response(self, status: int, path: str) -> None:
        """Count one response of the API listener."""
        key = str(status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.by_path[path] = self.by_path.get(path, 0) + 1

    def reset(self) -> None:
        """Zero everything but in_flight (those requests are still running)."""
        in_flight, introspection = self.in_flight, self.introspection
        self.__init__()
        self.in_flight = in_flight
        introspection.clear()          # the same dict: the engine routes hold it
        self.introspection = introspection

    def to_json(self) -> dict:
        """The counters as GET /admin/counters shows them."""
        return {"requests": dict(sorted(self.requests.items())), "by_path": dict(sorted(self.by_path.items())),
                "ws": dict(sorted(self.ws.items())),
                "tokens": {"input": self.input_tokens, "output": self.output_tokens},
                "streams_started": self.streams_started, "streams_completed": self.streams_completed,
                "streams_cut": self.streams_cut, "malformed_chunks": self.malformed_chunks,
                "client_disconnects": self.client_disconnects, "hangs": self.hangs, "in_flight": self.in_flight,
                "introspection": dict(sorted(self.introspection.items()))}


class Lateness:
    """How late stream chunks leave relative to their scheduled deadline: the mock's own added jitter.

    A fixed-bucket histogram (cheap enough for every chunk), read at `GET /admin/lateness`.
    """

    BOUNDS_MS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 1000.0)

    def __init__(self) -> None:
        self._bounds_s = tuple(b / 1000.0 for b in self.BOUNDS_MS)
        self.clear()

    def clear(self) -> None:
        """Zero in place: running streams hold a bound `observe`."""
        self.counts = [0] * (len(self.BOUNDS_MS) + 1)
        self.max_s = 0.0

    def observe(self, late_s: float) -> None:
        """Record how late (seconds; negative = early) one chunk left."""
        self.counts[bisect.bisect_left(self._bounds_s, late_s)] += 1
        if late_s > self.max_s:
            self.max_s = late_s

    def quantile_ms(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile q (None when empty or past the last bound)."""
        total = sum(self.counts)
        if not total:
            return None
        seen = 0
        for bound, n in zip(self.BOUNDS_MS, self.counts, strict=False):
            seen += n
            if seen >= q * total:
                return bound
        return None

    def to_json(self) -> dict:
        """The histogram as GET /admin/lateness shows it."""
        return {"bounds_ms": list(self.BOUNDS_MS), "counts": list(self.counts), "chunks": sum(self.counts),
                "max_ms": round(self.max_s * 1000, 3), "p50_le_ms": self.quantile_ms(0.5),
                "p99_le_ms": self.quantile_ms(0.99)}


@dataclass(frozen=True, slots=True)
class FaultDraw:
    """What the fault dice said for one request."""

    error: int = 0          # 0 or the injected status
    hang: bool = False
    cut: bool = False
    malformed: bool = False


NO_FAULT = FaultDraw()


class MockState:
    """Everything the API and admin handlers share."""

    def __init__(self, latency: Latency, faults: Faults, limits: Limits, auth: ServerAuth,
                 seed: int | None = None, models: tuple[str, ...] = DEFAULT_MODELS) -> None:
        self.latency, self.faults, self.limits, self.auth = latency, faults, limits, auth
        self.models = models
        self.model = LatencyModel(latency, seed)
        # Faults draw from their own RNG, so turning a fault on does not shift the latency sequence.
        self.fault_rng = random.Random(None if seed is None else seed + 1)
        self.gate = Gate(latency.capacity)
        self.limiter = RateLimiter(limits)
        self.counters = Counters()
        # DeepSeek's context cache: a prompt that starts with a recently seen prefix is billed partly as
        # cache hits, in 64-token units (usage.prompt_cache_hit_tokens); 64k units (4M tokens) kept.
        self.context_cache = PrefixCache(CONTEXT_CACHE_UNITS, block_tokens=CONTEXT_CACHE_TOKENS)
        self.lateness = Lateness()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        # `opskit mock --engine ...` (enable_engine): the model-server model and its /metrics.
        self.engine: str | None = None
        self.sim = None
        self.engine_metrics = None
        self.metrics_up = True

    def request_id(self) -> str:
        """A new request id, unique within this process."""
        return f"mock-{self._prefix}-{next(self._ids)}"

    def draw_faults(self, stream: bool) -> FaultDraw:
        """Roll the dice for one request; cut and malformed apply to streams only."""
        f, rnd = self.faults, self.fault_rng.random
        if not (f.error_rate or f.hang_rate or f.cut_rate or f.malformed_rate):
            return NO_FAULT
        error = 0
        if f.error_rate:
            r, acc = rnd(), 0.0
            for status, rate in sorted(f.error_rate.items()):
                acc += rate
                if r < acc:
                    error = status
                    break
        hang = bool(f.hang_rate) and rnd() < f.hang_rate
        cut = stream and bool(f.cut_rate) and rnd() < f.cut_rate
        malformed = stream and bool(f.malformed_rate) and rnd() < f.malformed_rate
        return FaultDraw(error, hang, cut, malformed)

    def apply_latency(self, changes: object) -> None:
        """Admin update of the latency model; a capacity change takes effect at once."""
        self.latency.update(changes)
        self.gate.resize(self.latency.capacity)

    def enable_engine(self, engine: str, kv_capacity_tokens: int) -> None:
        """Play model server `engine` (vllm, sglang, tgi): KV cache, preemption, its /metrics."""
        from opskit.mock.engine_metrics import EngineMetrics
        from opskit.mock.engine_sim import EngineSim

        self.engine = engine
        self.sim = EngineSim(self.gate, kv_capacity_tokens)
        self.engine_metrics = EngineMetrics(engine, self.sim, self.models[0])

    def apply_engine(self, changes: object) -> None:
        """Admin update of the engine model: `kv_capacity_tokens`, `capacity`, `metrics_up`; all
        keys are checked before anything changes."""
        c = check_keys(changes, {"kv_capacity_tokens", "capacity", "metrics_up"}, "engine")
        if "kv_capacity_tokens" in c:
            if self.sim is None:
                raise SettingsError("kv_capacity_tokens: the mock plays no engine (start it with --engine)")
            positive_int("kv_capacity_tokens", c["kv_capacity_tokens"])
        if "metrics_up" in c and not isinstance(c["metrics_up"], bool):
            raise SettingsError(f"metrics_up: expected true or false, got {c['metrics_up']!r}")
        if "capacity" in c:
            self.apply_latency({"capacity": c["capacity"]})   # validates; nothing else changed yet
        if "kv_capacity_tokens" in c:
            self.sim.resize(c["kv_capacity_tokens"])
        if "metrics_up" in c:
            self.metrics_up = c["metrics_up"]

    def engine_json(self) -> dict:
        """GET /admin/engine: the engine model's settings and live state."""
        out = {"engine": self.engine, "capacity": self.latency.capacity, "metrics_up": self.metrics_up}
        if self.sim is not None:
            sim = self.sim
            sim.tick()
            out.update({"kv_capacity_tokens": sim.kv_capacity, "running": len(sim.running), "waiting": sim.waiting,
                        "kv_used_tokens": sim.used, "kv_usage": round(sim.usage, 6), "preemptions": sim.preemptions,
                        "prefix_cache_queries": sim.prefix_queries, "prefix_cache_hits": sim.prefix_hits})
        return out

    def reset(self) -> None:
        """`POST /admin/reset`: zero counters and forget rate-limit windows and daily quotas."""
        self.counters.reset()
        self.limiter.reset()
        self.lateness.clear()
