"""Prompts for load tests: synthetic ones of a chosen token length, or lines of a JSONL file.

Synthetic prompts are made of short filler words of four characters including the space, so a
server that estimates ~4 characters per token (as the mock and most tokenizers roughly do for
English) sees about the asked-for number of input tokens. Lengths are drawn from a normal
distribution (mean, spread) clipped to at least 1, from a seeded RNG so runs are repeatable.

A prompts file has one JSON object per line: either `{"messages": [...]}` (chat messages as
sent) or `{"prompt": "text"}`; an optional `"max_tokens"` overrides the output length.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from opskit.core.config import ConfigError

_WORDS = ("the", "and", "for", "you", "can", "not", "but", "all", "any", "her", "was", "one", "our",
          "out", "day", "get", "has", "him", "how", "man", "new", "now", "old", "see", "two", "way")


@dataclass(frozen=True)
class PromptSpec:
    """How prompts are made: token lengths (mean, spread) or a JSONL file of prompts."""

    input_tokens_mean: int = 64
    input_tokens_spread: int = 16
    output_tokens_mean: int = 64
    output_tokens_spread: int = 16
    file: str | None = None
    system: str = "You are a helpful assistant."


def _length(rng: random.Random, mean: int, spread: int) -> int:
    return max(1, round(rng.gauss(mean, spread))) if spread > 0 else max(1, mean)


def filler(n_tokens: int, rng: random.Random) -> str:
    """Text of about `n_tokens` tokens (one short word each)."""
    return " ".join(rng.choice(_WORDS) for _ in range(n_tokens))


def load_file(path: str) -> list[dict]:
    """Read a JSONL prompts file; a bad line is a ConfigError naming the line."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(str(p), "", f"a readable prompts file ({exc.strerror})") from None
    items: list[dict] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise ConfigError(str(p), f"line {i}", "a JSON object") from None
        ok = isinstance(obj, dict) and (isinstance(obj.get("prompt"), str) or (
            isinstance(obj.get("messages"), list) and obj["messages"]))
        if not ok:
            raise ConfigError(str(p), f"line {i}", '{"prompt": "..."} or {"messages": [...]}')
        items.append(obj)
    if not items:
        raise ConfigError(str(p), "", "at least one prompt")
    return items


class PromptSource:
    """Yields (messages, max_tokens) pairs. One per user greenlet; not thread-safe by design."""

    def __init__(self, spec: PromptSpec, seed: int | None = None) -> None:
        self.spec = spec
        self.rng = random.Random(seed)
        self.items = load_file(spec.file) if spec.file else None
        self._next = self.rng.randrange(len(self.items)) if self.items else 0

    def output_tokens(self) -> int:
        """An output length drawn from the spec."""
        return _length(self.rng, self.spec.output_tokens_mean, self.spec.output_tokens_spread)

    def user_text(self) -> str:
        """A user message of the configured length (synthetic mode)."""
        return filler(_length(self.rng, self.spec.input_tokens_mean, self.spec.input_tokens_spread), self.rng)

    def next(self) -> tuple[list[dict], int]:
        """The next prompt as chat messages, and its max_tokens."""
        if self.items:
            item = self.items[self._next % len(self.items)]
            self._next += 1
            if "messages" in item:
                messages = list(item["messages"])
            else:
                messages = [{"role": "user", "content": item["prompt"]}]
            max_tokens = item.get("max_tokens")
            return messages, int(max_tokens) if isinstance(max_tokens, int) else self.output_tokens()
        return ([{"role": "system", "content": self.spec.system},
                 {"role": "user", "content": self.user_text()}], self.output_tokens())


def conversation_messages(system: str, turns: list[tuple[str, str]], question: str,
                          keep_turns: int) -> list[dict]:
    """Chat history for the next turn: system + the last `keep_turns` (user, assistant) turns + question."""
    messages = [{"role": "system", "content": system}]
    for user, assistant in turns[-keep_turns:] if keep_turns > 0 else []:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": question})
    return messages
