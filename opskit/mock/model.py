"""The latency model: a whole request's schedule, sampled at admission from one seeded RNG.

TTFT and the inter-token latency are `mean + gaussian jitter`, clipped at 0; the output length is
`normal(mean, spread)` rounded and clipped to [1, max_tokens]. A schedule is sampled in full before
the response headers go out, so the headers can carry its ground truth (`x-mock-ttft-ms`, ...), and it
is then played against absolute deadlines so that sleeps do not accumulate drift. Chunk j of a stream
carries `tokens_per_chunk` tokens and is due at `ttft + sum of the ITL gaps of the tokens before it`.

The same seed gives the same sequence of schedules (in admission order).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from opskit.mock.settings import Latency

# Synthetic output: one word = one token, plain ASCII, so they are pasted into pre-encoded JSON
# templates without escaping.
_TEXT = ("the quick brown fox jumps over a lazy dog while seven patient operators watch graphs of "
         "latency tokens queues and errors rise then fall as the release gate decides whether this "
         "build ships today or waits for another careful look at its numbers")
VOCAB = tuple(" " + w for w in _TEXT.split(" "))
VOCAB_BYTES = tuple(w.encode() for w in VOCAB)


def estimate_tokens(text: str) -> int:
    """Deterministic prompt-token estimate: about four characters a token, at least one."""
    return max(1, (len(text) + 3) // 4)


REASONING, CONTENT = 1, 0


def plan_chunks(length: int, per: int, reasoning: bool) -> list[tuple[int, int, int]]:
    """(kind, first token, token count) of each chunk of one choice.

    A reasoning model spends the first half of its tokens (rounded down) on `reasoning_content`;
    a chunk never mixes the two kinds, so the boundary may leave one short chunk.
    """
    r = length // 2 if reasoning else 0
    out = [(REASONING, i, min(per, r - i)) for i in range(0, r, per)]
    out += [(CONTENT, i, min(per, length - i)) for i in range(r, length, per)]
    return out


@dataclass(slots=True)
class Schedule:
    """One request's sampled plan. Times are seconds after admission."""

    ttft: float                          # admission -> first text chunk, extra TTFT included
    chunk_times: list[float]             # due time of every chunk step, chunk_times[0] == ttft
    lengths: list[int]                   # output tokens of each choice
    plans: list[list[tuple[int, int, int]]]   # each choice's chunks, see plan_chunks()
    word_offset: int                     # where in VOCAB this request's text starts

    @property
    def output_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def reasoning_tokens(self) -> int:
        return sum(c for plan in self.plans for kind, _, c in plan if kind == REASONING)

    @property
    def end(self) -> float:
        return self.chunk_times[-1]

    def words(self, choice: int, start: int, count: int) -> bytes:
        """The text of tokens [start, start+count) of a choice, as bytes."""
        base = self.word_offset + choice * 7 + start
        n = len(VOCAB_BYTES)
        return b"".join(VOCAB_BYTES[(base + i) % n] for i in range(count))

    def text(self, choice: int, kind: int) -> str:
        """The whole reasoning or content text of a choice (non-streamed responses)."""
        return b"".join(self.words(choice, s, c) for k, s, c in self.plans[choice] if k == kind).decode()


class LatencyModel:
    """Samples schedules from one `random.Random`, seeded for reproducible runs."""

    def __init__(self, latency: Latency, seed: int | None = None) -> None:
        self.latency = latency
        self.rng = random.Random(seed)

    def _length(self, max_tokens: int | None) -> int:
        lat = self.latency
        n = max(1, round(self.rng.gauss(lat.output_tokens_mean, lat.output_tokens_spread)))
        return min(n, max_tokens) if max_tokens else n

    def sample(self, n: int, max_tokens: int | None, extra_ttft_ms: float, reasoning: bool = False) -> Schedule:
        """The whole schedule of a request with `n` choices.

        Chunk j is due `ITL x (tokens in chunk j)` after chunk j-1, so that the measured ITL (gap
        divided by the later chunk's tokens) has the configured mean for any tokens-per-chunk.
        """
        lat, rng = self.latency, self.rng
        ttft = max(0.0, rng.gauss(lat.ttft_ms, lat.ttft_jitter_ms)) if lat.ttft_jitter_ms else lat.ttft_ms
        ttft = (ttft + extra_ttft_ms) / 1000.0
        lengths = [self._length(max_tokens) for _ in range(n)]
        plans = [plan_chunks(length, lat.tokens_per_chunk, reasoning) for length in lengths]
        longest = max(plans, key=len)
        mean, jitter = lat.itl_ms / 1000.0, lat.itl_jitter_ms / 1000.0
        gauss = rng.gauss
        times = [ttft]
        t = ttft
        for _, _, count in longest[1:]:
            if jitter:
                for _ in range(count):
                    t += max(0.0, gauss(mean, jitter))
            else:
                t += mean * count
            times.append(t)
        return Schedule(ttft, times, lengths, plans, rng.randrange(len(VOCAB)))
