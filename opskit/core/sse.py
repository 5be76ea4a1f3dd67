"""Incremental Server-Sent Events parsing and LLM stream accounting. Pure code, no I/O.

`SSEParser.feed()` takes bytes as they arrive (several events in one read, one event split across
reads, `\\r\\n` or `\\r` line endings, `:` keep-alive comments) and returns the data payloads of the
events it completed; it never holds more than one unfinished event. `StreamMeter` turns payloads of
an OpenAI-style chat/completions stream into timings and token counts as DESIGN.md defines them.
"""

from __future__ import annotations

import json
from json.scanner import make_scanner

DONE = "[DONE]"
_scan = make_scanner(json.JSONDecoder())  # the C scanner without json.loads' wrappers (per chunk)


def _loads(payload: str):
    """json.loads for one event payload, ~1 us cheaper: scan one value, allow only trailing space."""
    try:
        obj, end = _scan(payload, 0)
    except StopIteration:  # leading whitespace or no value: let json.loads decide
        return json.loads(payload)
    if end != len(payload) and payload[end:].strip():
        raise ValueError("extra data after the JSON value")
    return obj


class SSEParser:
    """Feed raw bytes, get back the `data` payloads of each completed event, in order."""

    __slots__ = ("_tail", "_data", "_pending_cr")

    def __init__(self) -> None:
        self._tail = b""          # an unfinished line
        self._data: list[str] = []  # data lines of the event being read
        self._pending_cr = False  # the last read ended in \r: a following \n belongs to it

    def feed(self, chunk: bytes) -> list[str]:
        # Fast path (a proxy's per-chunk hot spot): exactly one whole `data: ...` event, nothing pending.
        if (chunk[:6] == b"data: " and chunk[-2:] == b"\n\n" and chunk.find(b"\n", 6) == len(chunk) - 2
                and not self._tail and not self._data and not self._pending_cr and b"\r" not in chunk):
            return [chunk[6:-2].decode("utf-8", "replace")]
        if not chunk:
            return []
        if self._pending_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._pending_cr = chunk[-1:] == b"\r"
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._tail:
            chunk = self._tail + chunk
        lines = chunk.split(b"\n")
        self._tail = lines.pop()
        out: list[str] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append("\n".join(data))
                    data.clear()
                continue
            if line[:5] == b"data:":
                value = line[5:]
                if value[:1] == b" ":
                    value = value[1:]
                data.append(value.decode("utf-8", "replace"))
            # comments (":...") and other fields (event, id, retry) carry nothing opskit counts
        return out

    def close(self) -> list[str]:
        """End of stream: an event without its final blank line is still delivered."""
        out = self.feed(b"\n\n") if (self._tail or self._data) else []
        self._tail, self._pending_cr = b"", False
        return out


class StreamMeter:
    """Accounts one streamed response from its data payloads.

    Times are absolute `perf_counter()` readings passed in by the caller; `t0` is the moment the
    request was sent (or, for open-loop load, scheduled).
    """

    __slots__ = ("t0", "first_token", "first_output", "last_text", "text_chunks", "input_tokens",
                 "output_tokens", "usage_seen", "done", "malformed", "stream_error", "gaps")

    def __init__(self, t0: float, keep_gaps: bool = False) -> None:
        self.t0 = t0
        self.first_token: float | None = None    # first content or reasoning_content
        self.first_output: float | None = None   # first content (skips reasoning)
        self.last_text: float | None = None
        self.text_chunks = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.usage_seen = False
        self.done = False
        self.malformed = 0
        self.stream_error: str | None = None
        self.gaps: list[float] | None = [] if keep_gaps else None

    def on_data(self, payload: str, now: float) -> None:
        """Account one event payload received at `now`."""
        if payload == DONE:
            self.done = True
            return
        try:
            obj = _loads(payload)
        except ValueError:  # json.JSONDecodeError is a ValueError
            self.malformed += 1
            return
        if not isinstance(obj, dict):
            self.malformed += 1
            return
        if "error" in obj and obj["error"]:
            err = obj["error"]
            self.stream_error = str(err.get("type") or err.get("code") or "error") if isinstance(err, dict) else "error"
        content = reasoning = None
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = content or delta.get("content")
                reasoning = reasoning or delta.get("reasoning_content")
            elif choice.get("text"):  # /v1/completions streams carry `text`
                content = content or choice["text"]
        if content or reasoning:
            self._text(now, bool(content))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage_seen = True
            self.input_tokens = int(usage.get("prompt_tokens") or 0)
            self.output_tokens = int(usage.get("completion_tokens") or 0)

    def _text(self, now: float, is_output: bool) -> None:
        if self.first_token is None:
            self.first_token = now
        elif self.gaps is not None and self.last_text is not None:
            self.gaps.append(now - self.last_text)
        if is_output and self.first_output is None:
            self.first_output = now
        self.last_text = now
        self.text_chunks += 1

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.t0

    @property
    def ttfot(self) -> float | None:
        return None if self.first_output is None else self.first_output - self.t0

    @property
    def tokens(self) -> tuple[int, int, bool]:
        """(input, output, from_usage): the server's usage when it sent one, else text chunks."""
        if self.usage_seen:
            return self.input_tokens, self.output_tokens, True
        return 0, self.text_chunks, False


def completion_usage(body: bytes) -> tuple[int, int, bool, bool]:
    """From a non-streamed JSON response: (input tokens, output tokens, from_usage, has_text)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return 0, 0, False, False
    if not isinstance(obj, dict):
        return 0, 0, False, False
    has_text = False
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            msg = choice.get("message")
            if isinstance(msg, dict) and (msg.get("content") or msg.get("reasoning_content")) or choice.get("text"):
                has_text = True
    usage = obj.get("usage")
    if isinstance(usage, dict):
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), True, has_text
    return 0, 0, False, has_text
