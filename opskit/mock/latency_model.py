"""The latency model: a whole request's schedule, sampled at admission from one seeded RNG.

TTFT and the inter-token latency are `mean + gaussian jitter`, clipped at 0; the output length is
`normal(mean, spread)` rounded and clipped to [1, max_tokens]. A schedule is sampled in full before
the response headers go out, so the headers can carry its ground truth (`x-mock-ttft-ms`, ...), and it
is then played against absolute deadlines so that sleeps do not accumulate drift. Chunk j of a stream
carries `tokens_per_chunk` tokens and is due at `ttft + sum of the ITL gaps of the tokens before it`.

The same seed gives the same sequence of schedules (in admission order).
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

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
    """(kind, first token, token count) of each chunk of one choice (Schedule.chunk, as a list).

    A reasoning model spends the first half of its tokens (rounded down) on `reasoning_content`;
    a chunk never mixes the two kinds, so the boundary may leave one short chunk.
    """
    r = length // 2 if reasoning else 0
    out = [(REASONING, i, min(per, r - i)) for i in range(0, r, per)]
    out += [(CONTENT, i, min(per, length - i)) for i in range(r, length, per)]
    return out


@dataclass(slots=True)
class Schedule:
    """One request's sampled plan; times are seconds after admission.

    Only the numbers that the headers need are drawn up front (TTFT, lengths, a per-request seed);
    chunks and inter-token gaps are computed as the stream is played, so a long stream costs no
    memory per token. The per-request RNG is seeded from the model's RNG: same seed, same streams.
    """

    ttft: float              # admission -> first text chunk, extra TTFT included
    lengths: list[int]       # output tokens of each choice
    reasoning: list[int]     # of which reasoning tokens, per choice
    per: int                 # tokens per chunk
    itl: float               # mean inter-token gap, seconds
    jitter: float            # its standard deviation, seconds
    seed: int                # seeds the gaps' RNG
    word_offset: int         # where in VOCAB this request's text starts
    stopped: list[bool] = field(default_factory=list)   # per choice: ended by a stop sequence

    @property
    def output_tokens(self) -> int:
        """Output tokens over all choices (usage.completion_tokens)."""
        return sum(self.lengths)

    @property
    def reasoning_tokens(self) -> int:
        """Of which reasoning tokens."""
        return sum(self.reasoning)

    def chunks(self, choice: int) -> int:
        """How many chunks a choice streams."""
        r, per = self.reasoning[choice], self.per
        return -(-r // per) + -(-(self.lengths[choice] - r) // per)

    def chunk(self, choice: int, j: int) -> tuple[int, int, int]:
        """(kind, first token, token count) of chunk j of a choice."""
        r, per, length = self.reasoning[choice], self.per, self.lengths[choice]
        rc = -(-r // per)
        if j < rc:
            start = j * per
            return REASONING, start, min(per, r - start)
        start = r + (j - rc) * per
        return CONTENT, start, min(per, length - start)

    @property
    def longest(self) -> int:
        """The choice with the most chunks: its chunks set the stream's steps."""
        return max(range(len(self.lengths)), key=self.chunks)

    def steps(self):
        """(due time, kind, first token, token count) of each chunk of the longest choice, lazily.

        Chunk j is due `ITL x (tokens in chunk j)` after chunk j-1, so that the measured ITL (gap
        divided by the later chunk's tokens) has the configured mean for any tokens-per-chunk.
        """
        c = self.longest
        r, per, length = self.reasoning[c], self.per, self.lengths[c]
        gauss = random.Random(self.seed).gauss if self.jitter else None
        mean, jitter = self.itl, self.jitter
        t, first = self.ttft, True
        for kind, lo, hi in ((REASONING, 0, r), (CONTENT, r, length)):
            for start in range(lo, hi, per):
                count = min(per, hi - start)
                if first:
                    first = False
                elif gauss is None:
                    t += mean * count
                else:
                    for _ in range(count):
                        g = gauss(mean, jitter)
                        t += g if g > 0.0 else 0.0
                yield t, kind, start, count

    def times(self):
        """Due time of every chunk step, lazily."""
        return (step[0] for step in self.steps())

    @property
    def end(self) -> float:
        """Due time of the last chunk (walks the gaps; used by non-streamed responses)."""
        if not self.jitter:   # closed form: every token after the first chunk's costs one ITL
            c = self.longest
            length = self.lengths[c]
            first = self.chunk(c, 0)[2] if length else 0
            return self.ttft + self.itl * (length - first)
        last = collections.deque(self.times(), maxlen=1)
        return last[0] if last else self.ttft

    def words(self, choice: int, start: int, count: int) -> bytes:
        """The text of tokens [start, start+count) of a choice, as bytes."""
        base = self.word_offset + choice * 7 + start
        n = len(VOCAB_BYTES)
        if count == 1:
            return VOCAB_BYTES[base % n]
        return b"".join(VOCAB_BYTES[(base + i) % n] for i in range(count))

    def apply_stop(self, stops: tuple[str, ...]) -> None:
        """End each choice's content before the first stop sequence in it (OpenAI leaves the stop out).

        Output stays whole tokens: the content keeps the words that end before the match.
        """
        self.stopped = [False] * len(self.lengths)
        for c, length in enumerate(self.lengths):
            r = self.reasoning[c]
            text = self.words(c, r, length - r).decode()
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if not hits:
                continue
            cut, kept, end = min(hits), 0, 0
            while kept < length - r and end + len(self.words(c, r + kept, 1)) <= cut:
                end += len(self.words(c, r + kept, 1))
                kept += 1
            self.lengths[c], self.stopped[c] = r + kept, True

    def text(self, choice: int, kind: int) -> str:
        """The whole reasoning or content text of a choice (non-streamed responses)."""
        r = self.reasoning[choice]
        start, count = (0, r) if kind == REASONING else (r, self.lengths[choice] - r)
        return self.words(choice, start, count).decode()


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
        """The schedule of a request with `n` choices (its gaps are drawn as it plays, see steps())."""
        lat, rng = self.latency, self.rng
        ttft = max(0.0, rng.gauss(lat.ttft_ms, lat.ttft_jitter_ms)) if lat.ttft_jitter_ms else lat.ttft_ms
        lengths = [self._length(max_tokens) for _ in range(n)]
        split = [length // 2 if reasoning else 0 for length in lengths]
        return Schedule((ttft + extra_ttft_ms) / 1000.0, lengths, split, lat.tokens_per_chunk,
                        lat.itl_ms / 1000.0, lat.itl_jitter_ms / 1000.0, rng.getrandbits(64),
                        rng.randrange(len(VOCAB)), [False] * n)
