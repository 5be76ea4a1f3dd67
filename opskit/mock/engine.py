"""One generation, transport-agnostic: checks, fault dice, admission, schedule, playback.

The HTTP (SSE and JSON) and WebSocket handlers share this path, so limits, faults and counters mean
the same on every transport. Order: quota (403) -> rate limits (429) -> injected error (5xx) -> hang
-> wait for capacity -> sample the schedule -> headers -> play it against absolute deadlines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from opskit.mock.latency_model import Schedule
from opskit.mock.state import REASONING_MODELS, FaultDraw, MockState
from opskit.mock.wire import Encoder, GenRequest, error_body

_ERRORS = {
    500: ("The server had an error while processing your request.", "server_error", "internal_error"),
    502: ("Bad gateway.", "server_error", "bad_gateway"),
    503: ("The engine is currently overloaded, please try again later.", "server_error", "overloaded"),
}


class Refused(Exception):
    """A request answered with an error instead of a generation."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class StreamCut(Exception):
    """The cut fault fired: the transport must be closed without the end of the stream."""


@dataclass(slots=True)
class Admission:
    """An admitted request holding a capacity slot (release it with `state.gate.release()`)."""

    rid: str
    req: GenRequest
    sched: Schedule
    enc: Encoder
    admitted: float          # time.perf_counter() when the slot was taken
    faults: FaultDraw
    headers: dict[str, str]  # rate-limit and ground-truth headers
    # With `--engine` (engine_sim): the request as the engine model sees it; a preempted request's
    # playback waits on `pause` and then runs `shift` seconds later than scheduled.
    seq: object = None
    pause: asyncio.Future | None = None
    shift: float = 0.0
    finished: bool = False   # the whole answer went out (else the engine counts an abort)


def check(state: MockState, req: GenRequest, identity: str) -> tuple[dict[str, str], FaultDraw]:
    """Quota, rate limits and injected errors; raises Refused. Returns rate headers and the fault draw."""
    if req.model not in state.models:
        raise Refused(400, error_body(f"The model '{req.model}' does not exist; available: "
                                      f"{', '.join(state.models)}.", "invalid_request_error",
                                      "model_not_found", "model"))
    lim = state.limiter
    if not lim.quota_available(identity):
        raise Refused(403, error_body(f"Daily quota exhausted ({state.limits.daily_quota} requests per day); "
                                      "it resets at 00:00 UTC.", "insufficient_quota", "quota_exhausted"))
    verdict = lim.check(identity, req.prompt_tokens)
    if not verdict.allowed:
        what = verdict.which
        limit = state.limits.rpm if what == "requests" else state.limits.tpm
        msg = f"Rate limit reached for {what} per {state.limits.window_s:g} s (limit {limit}); retry after " \
              f"{verdict.retry_after} s."
        raise Refused(429, error_body(msg, what, "rate_limit_exceeded"),
                      {"Retry-After": str(verdict.retry_after), **verdict.headers})
    lim.quota_use(identity)
    faults = state.draw_faults(req.stream)
    if faults.error:
        msg, type_, code = _ERRORS[faults.error]
        raise Refused(faults.error, error_body(msg, type_, code), verdict.headers)
    return verdict.headers, faults


class Tracked:
    """`with Tracked(state):` counts a request in flight for the handler's lifetime, and a client that
    went away (the handler cancelled) as a disconnect: one place keeps these counters exact."""

    __slots__ = ("counters",)

    def __init__(self, state: MockState) -> None:
        self.counters = state.counters

    def __enter__(self) -> None:
        self.counters.in_flight += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.counters.in_flight -= 1
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            self.counters.client_disconnects += 1
        return False


async def generate(state: MockState, req: GenRequest, identity: str, arrival: float, rid: str,
                   rate_headers: dict[str, str], faults: FaultDraw, respond: Callable[[Admission], Awaitable]):
    """A checked request from here on, for HTTP and WebSocket alike: the hang fault, then a capacity
    slot, then `respond(admission)`; the slot is given back however that ends."""
    if faults.hang:
        await hang(state)
    adm = await admit(state, req, identity, arrival, rid, rate_headers, faults)
    try:
        return await respond(adm)
    finally:
        state.gate.release()
        if adm.seq is not None:
            state.sim.leave(adm.seq)
            reason = adm.enc.finish_reason(adm.sched, adm.sched.longest) if adm.finished else None
            state.engine_metrics.finished(adm.seq, reason, req.n, req.max_tokens)


async def hang(state: MockState) -> None:
    """The hang fault: never answer; ends only when the client goes away (the handler is cancelled)."""
    state.counters.hangs += 1
    await asyncio.get_running_loop().create_future()


async def admit(state: MockState, req: GenRequest, identity: str, arrival: float, rid: str,
                rate_headers: dict[str, str], faults: FaultDraw) -> Admission:
    """Wait for capacity (and, with --engine, KV space), then sample the whole schedule; the caller
    must release the slot."""
    await state.gate.acquire()
    seq = None
    if state.sim is not None:
        try:
            seq = await state.sim.enter(req.prompt_tokens, req.text, arrival)
        except BaseException:
            state.gate.release()
            raise
    # before loop_now: the lookup's time is part of the queue the ground-truth headers report
    cached = state.context_cache.lookup(req.text, req.prompt_tokens)
    loop_now = time.perf_counter()
    sched = state.model.sample(req.n, req.max_tokens, state.faults.extra_ttft_ms,
                               req.kind == "chat" and req.model in REASONING_MODELS)
    if req.stop:
        sched.apply_stop(req.stop)
    queue = loop_now - arrival
    state.limiter.charge(identity, sched.output_tokens)
    state.counters.input_tokens += req.prompt_tokens
    headers = dict(rate_headers)
    headers.update({
        "x-mock-request-id": rid,
        "x-mock-queue-ms": f"{queue * 1000:.3f}",
        "x-mock-ttft-ms": f"{(queue + sched.ttft) * 1000:.3f}",
        "x-mock-output-tokens": str(sched.output_tokens),
        "x-mock-prompt-tokens": str(req.prompt_tokens),
    })
    enc = Encoder(req, rid, int(time.time()))
    enc.cached = cached
    adm = Admission(rid, req, sched, enc, loop_now, faults, headers)
    if seq is not None:
        adm.seq, seq.adm = seq, adm
    return adm


async def play(state: MockState, adm: Admission, send: Callable[[bytes], Awaitable[None] | None]) -> None:
    """Send a stream's chunk payloads on schedule; raises StreamCut when the cut fault fires.

    `send(payload)` frames one payload (SSE `data:` event or WebSocket message); it returns None when
    the bytes are handed over, or an awaitable to wait on (back-pressure, async transports). The
    caller sends the end marker.
    """
    clock = time.perf_counter   # not loop.time(): uvloop's clock has only millisecond resolution
    sched, enc, counters, t0 = adm.sched, adm.enc, state.counters, adm.admitted
    n, longest = len(sched.lengths), sched.longest
    counts = [sched.chunks(c) for c in range(n)]
    cut_at = counts[longest] // 2 if adm.faults.cut else -1
    bad_at = counts[longest] // 2 if adm.faults.malformed else -1
    if adm.req.kind == "chat":
        await _send_all(send, [enc.role(c) for c in range(n)])
    sleep, observe, text, words = asyncio.sleep, state.lateness.observe, enc.text, sched.words
    for j, step in enumerate(sched.steps()):
        if j == cut_at:
            counters.streams_cut += 1
            raise StreamCut
        if adm.pause is not None:   # preempted by the engine model: resume when it is readmitted
            await adm.pause
        deadline = t0 + adm.shift + step[0]
        delay = deadline - clock()
        if delay > 0:
            await sleep(delay)
        observe(clock() - deadline)
        for c in range(n):
            if j >= counts[c]:
                continue
            _, kind, start, count = step if c == longest else (0, *sched.chunk(c, j))
            payload = text(c, kind, words(c, start, count))
            if j == bad_at:
                payload = payload[: len(payload) // 2]   # cut mid-object: not valid JSON
                counters.malformed_chunks += 1
            if (r := send(payload)) is not None:
                await r
            counters.output_tokens += count
    tail = [enc.finish(c, enc.finish_reason(sched, c)) for c in range(n)]
    await _send_all(send, [*tail, enc.usage_chunk(sched)] if adm.req.include_usage else tail)
    adm.finished = True


async def _send_all(send: Callable[[bytes], Awaitable[None] | None], payloads: list[bytes]) -> None:
    for payload in payloads:
        if (r := send(payload)) is not None:
            await r


async def complete(state: MockState, adm: Admission) -> bytes:
    """A non-streamed generation: wait until its last token is due, then the whole body."""
    end = adm.sched.end
    while True:   # one sleep unless the engine model preempts it meanwhile (then: wait, and later)
        if adm.pause is not None:
            await adm.pause
        delay = adm.admitted + adm.shift + end - time.perf_counter()
        if delay <= 0:
            break
        await asyncio.sleep(delay)
    state.counters.output_tokens += adm.sched.output_tokens
    adm.finished = True
    return adm.enc.whole(adm.sched)
