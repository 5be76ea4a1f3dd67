"""Capacity (concurrent generations, FIFO queue) and per-identity rate limits and daily quotas.

Rate limits use a fixed window per identity that starts at the identity's first request after the
previous window ended (`window_s`, 60 s by default), so `reset` is exact and a test can wait for it.
`rpm` counts requests admitted in the window; `tpm` counts prompt + output tokens of the requests
admitted in it, and a request is refused when the window's tokens plus its prompt would pass the limit.
The daily quota counts admitted requests per identity and UTC day.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass

from opskit.mock.settings import Limits


class Gate:
    """A resizable FIFO semaphore: at most `capacity` holders, the rest wait in arrival order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot; waits (cancellably) when all are held."""
        if self.held < self.capacity and not self._waiters:
            self.held += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()      # granted just as we were cancelled: hand the slot on
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Give a slot back and wake the next waiters that now fit."""
        self.held -= 1
        self._wake()

    def resize(self, capacity: int) -> None:
        """Change the capacity now; waiters that fit are admitted at once."""
        self.capacity = capacity
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held < self.capacity:
            fut = self._waiters.popleft()
            if not fut.done():
                self.held += 1
                fut.set_result(None)


@dataclass(slots=True)
class _Window:
    start: float
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of a rate-limit check; `headers` go on the response either way."""

    allowed: bool
    headers: dict[str, str]
    retry_after: int = 0
    which: str = ""


class RateLimiter:
    """Per-identity fixed windows for rpm/tpm, and per-day request quotas."""

    def __init__(self, limits: Limits, clock=time.monotonic, wall=time.time) -> None:
        self.limits = limits
        self.clock, self.wall = clock, wall
        self._windows: dict[str, _Window] = {}
        self._daily: dict[str, tuple[int, int]] = {}   # identity -> (UTC day number, requests)

    def reset(self) -> None:
        """Forget every window and daily count."""
        self._windows.clear()
        self._daily.clear()

    def _window(self, identity: str, now: float) -> _Window:
        w = self._windows.get(identity)
        if w is None or now - w.start >= self.limits.window_s:
            w = self._windows[identity] = _Window(now)
        return w

    def check(self, identity: str, prompt_tokens: int) -> Verdict:
        """Admit one request (counting it) or refuse it with its Retry-After."""
        lim = self.limits
        if lim.rpm is None and lim.tpm is None:
            return Verdict(True, {})
        now = self.clock()
        w = self._window(identity, now)
        reset = max(0.0, w.start + lim.window_s - now)
        over_req = lim.rpm is not None and w.requests + 1 > lim.rpm
        over_tok = lim.tpm is not None and w.tokens + prompt_tokens > lim.tpm
        allowed = not (over_req or over_tok)
        if allowed:
            w.requests += 1
            w.tokens += prompt_tokens
        headers = self._headers(w, reset)
        which = "requests" if over_req else ("tokens" if over_tok else "")
        return Verdict(allowed, headers, max(1, math.ceil(reset)), which)

    def charge(self, identity: str, tokens: int) -> None:
        """Add a request's output tokens to its identity's window."""
        w = self._windows.get(identity)
        if w is not None:
            w.tokens += tokens

    def _headers(self, w: _Window, reset: float) -> dict[str, str]:
        lim, h = self.limits, {}
        reset_s = f"{max(1, math.ceil(reset))}s"
        if lim.rpm is not None:
            h["x-ratelimit-limit-requests"] = str(lim.rpm)
            h["x-ratelimit-remaining-requests"] = str(max(0, lim.rpm - w.requests))
            h["x-ratelimit-reset-requests"] = reset_s
        if lim.tpm is not None:
            h["x-ratelimit-limit-tokens"] = str(lim.tpm)
            h["x-ratelimit-remaining-tokens"] = str(max(0, lim.tpm - w.tokens))
            h["x-ratelimit-reset-tokens"] = reset_s
        return h

    def _today(self, identity: str) -> tuple[int, int]:
        day = int(self.wall() // 86400)
        seen_day, used = self._daily.get(identity, (day, 0))
        return day, (used if seen_day == day else 0)

    def quota_available(self, identity: str) -> bool:
        """False once the identity has used up today's quota (counts nothing)."""
        quota = self.limits.daily_quota
        return quota is None or self._today(identity)[1] < quota

    def quota_use(self, identity: str) -> None:
        """Count one admitted request against today's quota."""
        if self.limits.daily_quota is not None:
            day, used = self._today(identity)
            self._daily[identity] = (day, used + 1)
