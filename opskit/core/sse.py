"""Incremental Server-Sent Events parsing and LLM stream accounting. Pure code, no I/O.

`SSEParser.feed()` takes bytes as they arrive (several events in one read, one event split across
reads, `\\r\\n` or `\\r` line endings, `:` keep-alive comments) and returns the data payloads of the
events it completed; it never holds more than one unfinished event, and that one at most `max_line`
bytes: a peer's bytes are bounded (DESIGN.md), so a longer line or event ends the parse (`too_long`)
and the stream reads as broken. `StreamMeter` turns payloads of an OpenAI-style chat/completions
stream into timings and token counts as DESIGN.md defines them. Any value in a payload may be
garbage: a `usage` that is not a sane integer is ignored (tokens unknown), never an exception.
"""

from __future__ import annotations

import json
from json.scanner import make_scanner
from typing import Any, NamedTuple

import msgspec

DONE = "[DONE]"
DONE_BYTES = b"[DONE]"
MAX_LINE = 1024 * 1024    # an SSE line (or event) longer than this ends the parse: no real chunk is near it
ONE_EVENT_MAX = 16 * 1024  # a longer read is parsed line by line (not copied whole first: reads of many events)
MAX_ID_CHARS = 100        # a response id longer than this is cut (it labels an exemplar: 128 characters at most)
MAX_TOKENS = 10 ** 9      # a usage count above this is garbage (no context window is within 1000x of it)
_scan = make_scanner(json.JSONDecoder())  # the C scanner without json.loads' wrappers (per chunk)


def _loads(payload: str):
    """json.loads for one event payload, ~1 us cheaper: scan one value, allow only trailing space."""
    try:
        obj, end = _scan(payload, 0)
    except StopIteration:  # leading whitespace or no value: let json.loads decide
        return json.loads(payload)
    except RecursionError:  # nested deeper than the interpreter's stack: not a chunk anyone sends
        raise ValueError("JSON nested too deep") from None
    if end != len(payload) and payload[end:].strip():
        raise ValueError("extra data after the JSON value")
    return obj


def loads_utf8(data: bytes):
    """json.loads of a UTF-8 body without json.loads' encoding sniffing (~2 us a call); other encodings
    and a BOM go through json.loads as before. ValueError / RecursionError as json.loads."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return json.loads(data)
    return json.loads(data) if text[:1] == "\ufeff" else _loads(text)


class _Text(msgspec.Struct, gc=False):
    """A chunk's `delta` or a response's `message`: the text metering looks for."""

    content: Any = None
    reasoning_content: Any = None


class _Choice(msgspec.Struct, gc=False):
    delta: _Text | None = None
    text: Any = None  # /v1/completions streams carry `text`


class _Chunk(msgspec.Struct, gc=False):  # (no cycles in decoded JSON: untracked)
    """The fields of a stream chunk that metering reads; the others are checked as JSON and skipped."""

    id: Any = None
    choices: list[_Choice] | None = None
    usage: Any = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def _chunk_of_any(payload: str) -> _Chunk | None:
    """A payload `_Chunk` does not describe, parsed in full as json.loads reads it, as the `_Chunk` it
    amounts to (choices that are not objects skipped, a `delta` that is not an object read as none);
    None when it is not JSON or not an object."""
    try:
        obj = _loads(payload)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return None
    if type(obj) is not dict:  # (json makes plain dicts)
        return None
    choices = obj.get("choices")
    choices = [_Choice(_text_of(c.get("delta")), c.get("text")) for c in choices if type(c) is dict] \
        if type(choices) is list else None
    return _Chunk(obj.get("id"), choices, obj.get("usage"), obj.get("error"))


def _text_of(obj) -> _Text | None:
    """A full parse's `delta` or `message` as `_Text` (none when it is not an object)."""
    return _Text(obj.get("content"), obj.get("reasoning_content")) if type(obj) is dict else None


def _cut_id(rid) -> str:
    """A response id as an exemplar label may carry it: cut to MAX_ID_CHARS; "" when it is no string."""
    return rid[:MAX_ID_CHARS] if isinstance(rid, str) else ""


class SSEParser:
    """Feed raw bytes, get back the `data` payloads of each completed event, in order."""

    __slots__ = ("_tail", "_tail_len", "_data", "_data_len", "_pending_cr", "max_line", "too_long")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._tail: list[bytes] = []  # the pieces of an unfinished line (joined once, when it ends)
        self._tail_len = 0
        self._data: list[str] = []  # data lines of the event being read
        self._data_len = 0
        self._pending_cr = False  # the last read ended in \r: a following \n belongs to it
        self.max_line = max_line
        self.too_long = False     # a line or event went past max_line: nothing more is parsed

    def one_event(self, chunk: bytes) -> bytes | None:
        """The payload of `chunk` when it is exactly one whole `data: ...` event and nothing is pending
        (a stream's usual read: the per-chunk fast path, for `feed` and for callers that take bytes)."""
        n = len(chunk)
        if (n > ONE_EVENT_MAX or n > self.max_line or chunk[-2:] != b"\n\n" or chunk[:6] != b"data: " or self._tail
                or self._data or self._pending_cr):
            return None
        payload = chunk[6:-2]  # (10, 13: LF, CR; `in` with an int is a memchr, and parses no arguments)
        return payload if 10 not in payload and 13 not in payload else None

    def feed(self, chunk: bytes) -> list[str]:
        payload = self.one_event(chunk)
        if payload is not None:
            return [payload.decode("utf-8", "replace")]
        return self.feed_lines(chunk)

    def feed_lines(self, chunk: bytes) -> list[str]:
        """`feed` without the one-event fast path (for a caller that tried `one_event` already)."""
        if not chunk or self.too_long:
            return []
        if self._pending_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._pending_cr = chunk[-1:] == b"\r"
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if not lines:  # no line ends here: keep the piece without re-copying what is already kept
            return self._keep(rest)
        if self._tail:  # the kept pieces and this read's first line are one line: joined once
            self._tail.append(lines[0])
            lines[0] = b"".join(self._tail)
            self._tail, self._tail_len = [], 0
        # (one comparison in the usual case: no line can be longer than the read it came in)
        if (len(chunk) > self.max_line or len(lines[0]) > self.max_line) and max(map(len, lines)) > self.max_line:
            return self._overflow()
        out: list[str] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append("\n".join(data))
                    data.clear()
                    self._data_len = 0
                continue
            if line[:5] == b"data:":
                value = line[5:]
                if value[:1] == b" ":
                    value = value[1:]
                self._data_len += len(value)
                if self._data_len > self.max_line:  # many short data lines of one event: bounded too
                    return self._overflow()
                data.append(value.decode("utf-8", "replace"))
            # comments (":...") and other fields (event, id, retry) carry nothing opskit counts
        if rest:
            self._keep(rest)
        return out

    def _keep(self, piece: bytes) -> list[str]:
        if not piece:
            return []
        self._tail_len += len(piece)
        if self._tail_len > self.max_line:
            return self._overflow()
        self._tail.append(piece)
        return []

    def _overflow(self) -> list[str]:
        """A line or event over max_line: drop what is held and parse nothing more of this stream."""
        self.too_long = True
        self._tail, self._tail_len, self._data, self._data_len = [], 0, [], 0
        return []

    def close(self) -> list[str]:
        """End of stream: an event without its final blank line is still delivered."""
        out = self.feed(b"\n\n") if (self._tail or self._data) else []
        self._tail, self._tail_len, self._pending_cr = [], 0, False
        return out


class StreamMeter:
    """Accounts one streamed response from its data payloads.

    Times are absolute `perf_counter()` readings passed in by the caller; `t0` is the moment the
    request was sent (or, for open-loop load, scheduled).
    """

    __slots__ = ("t0", "first_token", "first_output", "last_text", "text_chunks", "input_tokens",
                 "output_tokens", "cached_tokens", "reasoning_tokens", "usage_seen", "done", "malformed",
                 "stream_error", "gaps", "response_id")

    def __init__(self, t0: float, keep_gaps: bool = False) -> None:
        self.t0 = t0
        self.first_token: float | None = None    # first content or reasoning_content
        self.first_output: float | None = None   # first content (skips reasoning)
        self.last_text: float | None = None
        self.text_chunks = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cached_tokens = 0      # of input_tokens, served from the provider's prompt cache
        self.reasoning_tokens = 0   # of output_tokens, spent on reasoning
        self.usage_seen = False
        self.done = False
        self.malformed = 0
        self.stream_error: str | None = None
        self.gaps: list[float] | None = [] if keep_gaps else None
        self.response_id: str | None = None  # the first chunk's `id` ("" once a chunk had none)

    def on_data(self, payload: str | bytes, now: float) -> None:
        """Account one event payload received at `now` (the proxy's per-chunk hot spot: kept flat), as
        text or as the UTF-8 bytes it came in. It is decoded into `_Chunk`, which reads only the fields
        metering needs (~4x cheaper than a full json parse); one that does not fit that shape (NaN,
        `choices` not a list of objects, not UTF-8, not JSON, ...) goes through the full parse."""
        if len(payload) == 6 and payload in (DONE_BYTES, DONE):  # (a length first: most payloads are not)
            self.done = True
            return
        try:
            chunk = _decode_chunk(payload)
        except msgspec.MsgspecError:
            chunk = _chunk_of_any(payload if type(payload) is str else payload.decode("utf-8", "replace"))
            if chunk is None:  # not JSON, or not an object
                self.malformed += 1
                return
        if self.response_id is None:
            self.response_id = _cut_id(chunk.id)
        err = chunk.error
        if err:
            self.stream_error = str(err.get("type") or err.get("code") or "error") if isinstance(err, dict) else "error"
        content = reasoning = None
        if chunk.choices:
            for choice in chunk.choices:
                delta = choice.delta
                if delta is not None:
                    content = content or delta.content
                    reasoning = reasoning or delta.reasoning_content
                elif choice.text:
                    content = content or choice.text
        if content or reasoning:  # a text chunk
            if self.first_token is None:
                self.first_token = now
            elif self.gaps is not None and self.last_text is not None:
                self.gaps.append(now - self.last_text)
            if content and self.first_output is None:
                self.first_output = now
            self.last_text = now
            self.text_chunks += 1
        usage = chunk.usage
        if usage is not None:
            usage = _usage(usage)
            if usage is not None:
                self.usage_seen = True
                self.input_tokens, self.output_tokens, self.cached_tokens, self.reasoning_tokens = usage

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.t0

    @property
    def ttfot(self) -> float | None:
        return None if self.first_output is None else self.first_output - self.t0

    @property
    def details(self) -> tuple[int, int]:
        """(cached input, reasoning) tokens from the server's usage; (0, 0) when unknown."""
        return (self.cached_tokens, self.reasoning_tokens) if self.usage_seen else (0, 0)

    @property
    def tokens(self) -> tuple[int, int, bool]:
        """(input, output, from_usage): the server's usage when it sent one, else text chunks."""
        if self.usage_seen:
            return self.input_tokens, self.output_tokens, True
        return 0, self.text_chunks, False


def _count(value) -> int | None:
    """A token count from `usage`: an int (a bool is not one) in 0..MAX_TOKENS; None for missing."""
    if value is None:
        return 0
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    return None


def _part(usage: dict, whole: int, *paths: tuple[str, ...]) -> int:
    """A part of `whole` (cached input, reasoning output) at the first of `paths` present; 0 (unknown)
    when it is garbage or larger than the whole it is part of."""
    for path in paths:
        value = usage
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            n = _count(value)
            return n if n is not None and n <= whole else 0
    return 0


def _usage(usage) -> tuple[int, int, int, int] | None:
    """(prompt, completion, cached prompt, reasoning) tokens of a `usage` object; None when there is
    none or its prompt/completion counts are garbage (`"x"`, Infinity, `[1]`, -1, 1e30, true): the
    call is still counted, its tokens are unknown. Cached input is DeepSeek's
    `prompt_cache_hit_tokens` or OpenAI's `prompt_tokens_details.cached_tokens`; reasoning is
    `completion_tokens_details.reasoning_tokens`. A garbage detail is unknown (0) on its own."""
    if not isinstance(usage, dict):
        return None
    inp, out = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if inp is None or out is None:
        return None
    cached = _part(usage, inp, ("prompt_cache_hit_tokens",), ("prompt_tokens_details", "cached_tokens"))
    reasoning = _part(usage, out, ("completion_tokens_details", "reasoning_tokens"))
    return inp, out, cached, reasoning


class BodyUsage(NamedTuple):
    """What a non-streamed JSON response says about its tokens (see `completion_usage`)."""

    input: int
    output: int
    from_usage: bool
    has_text: bool
    cached: int = 0      # of input, from the provider's prompt cache
    reasoning: int = 0   # of output, spent on reasoning


def completion_usage(body: bytes) -> BodyUsage:
    """From a non-streamed JSON response: input, output, from_usage, has_text, cached, reasoning.
    Never raises, whatever the body holds."""
    return completion_usage_and_id(body)[0]


class _BodyChoice(msgspec.Struct, gc=False):
    message: _Text | None = None
    text: Any = None


class _Body(msgspec.Struct, gc=False):
    """The fields of a non-streamed response that metering reads (the others are checked and skipped)."""

    id: Any = None
    choices: list[_BodyChoice] | None = None
    usage: Any = None


_decode_body = msgspec.json.Decoder(_Body).decode


def completion_usage_and_id(body: bytes) -> tuple[BodyUsage, str]:
    """completion_usage and the response's `id` ("" when none), from one parse. Never raises. The body
    is decoded into `_Body` (only what is read is built); one of another shape is parsed in full."""
    try:
        obj = _decode_body(body)
    except msgspec.MsgspecError:
        obj = _body_of_any(body)
        if obj is None:  # not JSON, or not an object
            return BodyUsage(0, 0, False, False), ""
    has_text = False
    for choice in obj.choices or ():
        msg = choice.message
        if msg is not None and (msg.content or msg.reasoning_content) or choice.text:
            has_text = True
    usage = _usage(obj.usage)
    if usage is not None:
        return BodyUsage(usage[0], usage[1], True, has_text, usage[2], usage[3]), _cut_id(obj.id)
    return BodyUsage(0, 0, False, has_text), _cut_id(obj.id)


def _body_of_any(body: bytes) -> _Body | None:
    """A body `_Body` does not describe, parsed in full as json.loads reads it, as the `_Body` it amounts
    to (choices that are not objects skipped); None when it is not JSON or not an object."""
    try:
        obj = loads_utf8(body)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the stack
        return None
    if not isinstance(obj, dict):
        return None
    choices = obj.get("choices")
    choices = [_BodyChoice(_text_of(c.get("message")), c.get("text")) for c in choices if type(c) is dict] \
        if isinstance(choices, list) else None
    return _Body(obj.get("id"), choices, obj.get("usage"))
