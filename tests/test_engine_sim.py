"""The engine model alone (no network): KV admission order, newest-first preemption and resume with
the pause added to the schedule, and the prefix cache's hash chain and LRU bound."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from opskit.mock.engine_sim import BLOCK_CHARS, BLOCK_TOKENS, EngineSim, PrefixCache


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _adm(started: float, tokens: int, itl: float = 1.0) -> SimpleNamespace:
    """An Admission stand-in: the schedule fields the engine model reads."""
    sched = SimpleNamespace(ttft=0.0, itl=itl, output_tokens=tokens, lengths=[tokens])
    return SimpleNamespace(sched=sched, admitted=started, shift=0.0, pause=None)


def test_kv_overflow_preempts_the_newest_and_it_resumes_later_with_the_pause_added():
    async def run():
        clock = Clock()
        sim = EngineSim(SimpleNamespace(waiting=0), kv_capacity=100, prefix_caching=False, clock=clock)
        old = await sim.enter(30, "", clock.t)
        old.adm = _adm(clock.t, 50)
        new = await sim.enter(30, "", clock.t)
        new.adm = _adm(clock.t, 50)
        assert len(sim.running) == 2 and sim.used == 60
        third = asyncio.ensure_future(sim.enter(50, "", clock.t))   # 60 + 50 > 100: waits
        await asyncio.sleep(0)
        assert not third.done() and sim.waiting == 1
        clock.t += 20                        # each now holds 30 + 21 generated tokens: 102 > 100
        sim.tick()
        assert list(sim.running) == [old] and new.adm.pause is not None and sim.preemptions == 1
        assert list(sim.kv_waiting)[0] is new   # preempted: back at the head of the queue
        clock.t += 30                        # old has finished its 50 tokens
        sim.leave(old)
        assert new.running and new.adm.pause is None and new.adm.shift == 30   # resumed, 30 s later
        assert new.held == 30 + 21 and not third.done()   # 51 + 50 > 100: the third still waits
        sim.leave(new)
        await asyncio.wait_for(third, 5)     # admitted once the space was free
        assert third.result().running and sim.used == 50
        assert sim._ticker is not None
        sim._ticker.cancel()

    asyncio.run(run())


def test_a_prompt_larger_than_the_cache_still_runs_alone():
    async def run():
        sim = EngineSim(SimpleNamespace(waiting=0), kv_capacity=10, prefix_caching=False, clock=Clock())
        seq = await sim.enter(500, "", 0.0)
        assert seq.running and sim.usage == 1.0
        sim.leave(seq)
        assert sim.used == 0 and sim.usage == 0.0
        sim._ticker.cancel()

    asyncio.run(run())


def test_prefix_cache_counts_leading_blocks_and_stays_bounded():
    cache = PrefixCache(max_blocks=4)
    a = "a" * BLOCK_CHARS + "b" * BLOCK_CHARS + "c" * BLOCK_CHARS
    assert cache.lookup(a, 48) == 0
    assert cache.lookup(a, 48) == 3 * BLOCK_TOKENS
    # Same second block after a different first block: a chain, so no hit.
    assert cache.lookup("x" * BLOCK_CHARS + "b" * BLOCK_CHARS, 32) == 0
    assert len(cache._blocks) == 4       # LRU bound held (5 distinct chained blocks were seen)
    assert cache.lookup("short", 2) == 0
