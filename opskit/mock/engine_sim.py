"""The mock's model-server model: running and waiting requests, a KV cache in tokens with
preemption, a prefix cache, and the per-request server-side timings an engine reports.

Only built with `opskit mock --engine ...`. The capacity gate (limits.Gate) stays the limit on
concurrent sequences (vLLM's max_num_seqs); behind it a request must also fit in the KV cache:

- a request holds its prompt tokens plus the tokens generated so far (n choices decode in
  parallel); generation follows the request's sampled schedule, so the KV cache fills as streams
  play, whatever the transport;
- a request is admitted (running) only when its tokens fit; otherwise it waits in FIFO order,
  preempted requests first (as vLLM puts them back at the head of the waiting queue);
- every `TICK_S` (and at every scrape or KV-capacity change) held tokens are recomputed; while they
  overflow the capacity, the most recently admitted running request is preempted: its stream pauses
  (no tokens are sent), it frees its KV and waits; when it fits again it resumes where it stopped
  (vLLM recomputes its prompt and output so far: it needs all of them back);
- a request is always admitted when nothing runs, so one prompt larger than the cache cannot
  deadlock the mock (usage then reads above 1 internally and is reported clipped at 1).

A preempted request keeps its capacity slot: `running` counts admitted, unpaused requests,
`waiting` counts the gate's queue plus the KV queue (preempted requests included).

Prefix cache: a prompt is cut into blocks of `BLOCK_CHARS` characters, each block hashed together
with every block before it (vLLM's hash chain); the leading blocks already seen are hits, in
tokens. Seen blocks are kept in an LRU of at most kv_capacity / BLOCK_TOKENS entries.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

TICK_S = 0.1
BLOCK_TOKENS = 16
BLOCK_CHARS = 4 * BLOCK_TOKENS    # the mock's prompt estimate is ~4 characters a token
DEFAULT_KV_CAPACITY_TOKENS = 1 << 20


class PrefixCache:
    """Hash-chained prompt blocks in an LRU; `lookup(text)` returns the cached prefix in tokens.

    `block_tokens`: the engine's KV block (16, as vLLM) or a hosted API's cache unit (64 tokens, as
    DeepSeek's context cache: only whole units of a prefix seen before are hits)."""

    def __init__(self, max_blocks: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.max_blocks = max(1, max_blocks)
        self.block_tokens, self.block_chars = block_tokens, 4 * block_tokens  # ~4 characters a token
        self._blocks: collections.OrderedDict[int, None] = collections.OrderedDict()

    def lookup(self, text: str, prompt_tokens: int) -> int:
        """Cached leading tokens of this prompt; every full block of it is then cached (and fresh)."""
        blocks, h, hits, leading, size = self._blocks, 0, 0, True, self.block_chars
        for start in range(0, len(text) - size + 1, size):
            h = hash((h, text[start:start + size]))
            if leading and h in blocks:
                hits += 1
                blocks.move_to_end(h)
                continue
            leading = False
            blocks[h] = None
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)
        return min(prompt_tokens, hits * self.block_tokens)


@dataclass(eq=False, slots=True)
class Seq:
    """One request as the engine sees it."""

    prompt: int
    arrival: float
    adm: object = None            # engine.Admission, once the schedule is sampled
    started: float = 0.0          # first admission to the KV cache (end of queueing)
    held: int = 0                 # KV tokens held at the last recount
    running: bool = False
    fut: asyncio.Future | None = None   # first admission, while it waits for KV
    paused_at: float = 0.0
    paused_gen: int = 0
    pre_first_pause: float = 0.0  # paused before its first token: part of its TTFT
    preemptions: int = 0
    cached: int = 0


def generated(seq: Seq, now: float) -> int:
    """Output tokens the request has produced by `now`, following its schedule (all choices)."""
    adm = seq.adm
    if adm is None:
        return 0
    if not seq.running:
        return seq.paused_gen
    sched = adm.sched
    t = now - adm.admitted - adm.shift - sched.ttft
    if t < 0:
        return 0
    total = sched.output_tokens
    if sched.itl <= 0:
        return total
    return min(total, len(sched.lengths) * (1 + int(t / sched.itl)))


class EngineSim:
    """Running/waiting sequences over a KV cache of `kv_capacity` tokens; see the module docstring."""

    def __init__(self, gate, kv_capacity: int = DEFAULT_KV_CAPACITY_TOKENS, prefix_caching: bool = True,
                 clock=time.perf_counter) -> None:
        self.gate, self.kv_capacity, self.clock = gate, kv_capacity, clock
        self.prefix = PrefixCache(kv_capacity // BLOCK_TOKENS) if prefix_caching else None
        self.running: dict[Seq, None] = {}          # admission order: the newest is preempted first
        self.kv_waiting: collections.deque[Seq] = collections.deque()
        self.used = 0
        self.preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.observer = None                        # engine_metrics.EngineMetrics, told about each finish
        self._ticker: asyncio.Task | None = None

    # --- what /metrics reads -------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Requests waiting: for a capacity slot, for KV space, or preempted."""
        return self.gate.waiting + len(self.kv_waiting)

    @property
    def usage(self) -> float:
        """KV-cache usage, 0-1."""
        return min(1.0, self.used / self.kv_capacity) if self.kv_capacity else 1.0

    # --- lifecycle -----------------------------------------------------------------------------
    async def enter(self, prompt: int, text: str, arrival: float) -> Seq:
        """Admit a request to the KV cache, waiting (cancellably) while it does not fit."""
        seq = Seq(prompt, arrival)
        if self.prefix is not None:
            seq.cached = self.prefix.lookup(text, prompt)
            self.prefix_queries += prompt
            self.prefix_hits += seq.cached
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())
        if not self.kv_waiting and self._fits(prompt):
            self._start(seq, self.clock())
            return seq
        seq.fut = asyncio.get_running_loop().create_future()
        self.kv_waiting.append(seq)
        try:
            await seq.fut
        except asyncio.CancelledError:
            if seq.running:      # admitted just as it was cancelled: give the space back
                self.leave(seq)
            elif seq in self.kv_waiting:
                self.kv_waiting.remove(seq)
            raise
        return seq

    def leave(self, seq: Seq) -> None:
        """The request ended (completed, cut or abandoned): free its KV and admit who now fits."""
        if seq.running:
            del self.running[seq]
            self.used -= seq.held
            seq.running = False
        elif seq in self.kv_waiting:
            self.kv_waiting.remove(seq)
        seq.held = 0
        if self.kv_waiting:
            self._admit_waiters(self.clock())

    def resize(self, kv_capacity: int) -> None:
        """Change the KV capacity now: preempt when it shrank, admit when it grew."""
        self.kv_capacity = kv_capacity
        if self.prefix is not None:
            self.prefix.max_blocks = max(1, kv_capacity // BLOCK_TOKENS)
        self.tick()

    def tick(self) -> None:
        """Recount held tokens, preempt the newest requests while they overflow, admit waiters."""
        now = self.clock()
        total = 0
        for seq in self.running:
            seq.held = seq.prompt + generated(seq, now)
            total += seq.held
        self.used = total
        if self.used > self.kv_capacity:
            for seq in reversed(list(self.running)):
                if self.used <= self.kv_capacity or len(self.running) <= 1:
                    break
                if seq.adm is not None:
                    self._preempt(seq, now)
        if self.kv_waiting:
            self._admit_waiters(now)

    # --- internals -----------------------------------------------------------------------------
    def _fits(self, need: int) -> bool:
        return self.used + need <= self.kv_capacity or not self.running

    def _start(self, seq: Seq, now: float) -> None:
        seq.held = seq.prompt + seq.paused_gen
        seq.running = True
        self.running[seq] = None
        self.used += seq.held
        if not seq.started:
            seq.started = now
        adm = seq.adm
        if adm is not None and adm.pause is not None:     # a preempted request resumes
            paused = now - seq.paused_at
            adm.shift += paused
            if seq.paused_gen == 0:
                seq.pre_first_pause += paused
            if not adm.pause.done():
                adm.pause.set_result(None)
            adm.pause = None
        if seq.fut is not None and not seq.fut.done():
            seq.fut.set_result(None)

    def _preempt(self, seq: Seq, now: float) -> None:
        seq.paused_gen = generated(seq, now)
        del self.running[seq]
        self.used -= seq.held
        seq.held, seq.running, seq.paused_at = 0, False, now
        seq.preemptions += 1
        self.preemptions += 1
        seq.adm.pause = asyncio.get_running_loop().create_future()
        self.kv_waiting.appendleft(seq)

    def _admit_waiters(self, now: float) -> None:
        while self.kv_waiting:
            seq = self.kv_waiting[0]
            if not self._fits(seq.prompt + seq.paused_gen):
                return
            self.kv_waiting.popleft()
            self._start(seq, now)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self.running:
                self.tick()
