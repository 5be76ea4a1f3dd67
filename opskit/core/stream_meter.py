"""LLM stream accounting: `StreamMeter` turns the data payloads of an OpenAI-style chat/completions
stream into timings and token counts as DESIGN.md defines them. Pure code, no I/O.

Templates (the proxy's per-event fast path). A server writes a stream's text chunks from one
template: the same bytes before and after the text, only the text changes (`{"id":"x",...,"delta":
{"content":"` + text + `"},...}`). A meter made with `templates=True` learns that template from a
chunk it has decoded, and proves it: the chunk with its text replaced by a probe, then by nothing,
decodes to exactly that text and to no text (so the slot is that one JSON string, and no other field
says anything). Then an event that is the template around a plain text (no quote, backslash or
control character: any such bytes make a valid JSON string) is accounted as the full parse would
account it, without parsing: about half the instructions of a decode. Anything else takes the full path.
"""

from __future__ import annotations

import msgspec

from opskit.core.llm_json import chunk_of_any, cut_id, decode_chunk, usage_counts
from opskit.core.sse import DONE, DONE_BYTES, ONE_EVENT_MAX

LEARN_TRIES = 3   # chunks a stream's templates are learned from, at most (a few decodes each)
MISS_LIMIT = 8    # templates that miss more events than this plus half the text chunks are dropped
_NOT_PLAIN = bytes(range(32)) + b'"\\'  # bytes a text must not hold to fill a template as it is
_FLAG = bytes(b ^ 1 if b in _NOT_PLAIN else b for b in range(256))  # translate(): returns `text` itself if plain


class StreamMeter:
    """Accounts one streamed response from its data payloads.

    Times are absolute `perf_counter()` readings passed in by the caller; `t0` is the moment the
    request was sent (or, for open-loop load, scheduled).
    """

    __slots__ = ("t0", "first_token", "first_output", "last_text", "text_chunks", "input_tokens",
                 "output_tokens", "cached_tokens", "reasoning_tokens", "usage_seen", "done", "malformed",
                 "stream_error", "gaps", "response_id", "templates", "learn", "misses")

    def __init__(self, t0: float, keep_gaps: bool = False, templates: bool = False) -> None:
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
        # (head, tail, len(head), len(tail), output): an event `head + text + tail` is a chunk whose
        # content (output) or reasoning_content is `text` and that says nothing else
        self.templates: list[tuple[bytes, bytes, int, int, bool]] = []
        self.learn = LEARN_TRIES if templates else 0  # chunks left to learn a template from
        self.misses = 0  # one-event reads the templates did not match

    def on_event(self, event: bytes, now: float) -> bool:
        """Account `event`, one whole `data: ...` event as read (nothing of an earlier read pending), if it
        fills a learned template: True. False: nothing was accounted (SSEParser and on_data take it)."""
        n = len(event)
        for head, tail, lh, lt, output in self.templates:
            if lh + lt <= n <= ONE_EVENT_MAX and event.startswith(head) and event.endswith(tail):
                text = event[lh:n - lt]
                if text.translate(_FLAG) is not text:
                    break  # a quote, a backslash, a control character: the full parse decides
                if text:
                    self._text(now, output)
                return True
        if event.find(b"\n") == n - 2:  # one event that fits no template (a read of several says nothing)
            self.misses += 1
            if self.misses > MISS_LIMIT + self.text_chunks // 2:  # a field that changes in every chunk: stop
                self.templates, self.learn = [], 0
        return False

    def on_data(self, payload: str | bytes, now: float) -> None:
        """Account one event payload received at `now` (the proxy's per-chunk hot spot: kept flat), as
        text or as the UTF-8 bytes it came in. It is decoded into `_Chunk`, which reads only the fields
        metering needs (~4x cheaper than a full json parse); one that does not fit that shape (NaN,
        `choices` not a list of objects, not UTF-8, not JSON, ...) goes through the full parse."""
        if len(payload) == 6 and payload in (DONE_BYTES, DONE):  # (a length first: most payloads are not)
            self.done = True
            return
        try:
            chunk = decode_chunk(payload)
        except msgspec.MsgspecError:
            chunk = chunk_of_any(payload if type(payload) is str else payload.decode("utf-8", "replace"))
            if chunk is None:  # not JSON, or not an object
                self.malformed += 1
                return
        if self.response_id is None:
            self.response_id = cut_id(chunk.id)
        err = chunk.error
        if err:
            self.stream_error = str(err.get("type") or err.get("code") or "error") if isinstance(err, dict) else "error"
        content, reasoning = _texts(chunk)
        usage = chunk.usage
        if content or reasoning:  # a text chunk
            self._text(now, bool(content))
            if self.learn and not err and usage is None and type(payload) is bytes:
                self._learn(payload, content or reasoning, bool(content))
        if usage is not None:
            usage = usage_counts(usage)
            if usage is not None:
                self.usage_seen = True
                self.input_tokens, self.output_tokens, self.cached_tokens, self.reasoning_tokens = usage

    def _text(self, now: float, output: bool) -> None:
        """A text chunk at `now`; `output`: it carries content (not only reasoning)."""
        if self.first_token is None:
            self.first_token = now
        elif self.gaps is not None and self.last_text is not None:
            self.gaps.append(now - self.last_text)
        if output and self.first_output is None:
            self.first_output = now
        self.last_text = now
        self.text_chunks += 1

    def _learn(self, payload: bytes, text, output: bool) -> None:
        """Learn a template from `payload`, a decoded chunk whose only text is `text` (see the module)."""
        self.learn -= 1
        if type(text) is not str:
            return
        raw = text.encode("utf-8", "surrogatepass")
        if raw.translate(_FLAG) is not raw:
            return
        at = payload.rfind(b'"' + raw + b'"')
        if at < 0:
            return
        head, tail = payload[:at + 1], payload[at + 1 + len(raw):]
        probe = "~" + text  # (not `text`: a slot in another field must not pass for the text's own)
        want = (probe, None) if output else (None, probe)
        if _plain_texts(head + probe.encode() + tail) != want or _plain_texts(head + tail) != (None, None):
            return
        self.templates.append((b"data: " + head, tail + b"\n\n", len(head) + 6, len(tail) + 2, output))
        if len(self.templates) == 2:  # content and reasoning: a stream has no more kinds of text chunk
            self.learn = 0

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


def _texts(chunk) -> tuple:
    """(content, reasoning) of a decoded chunk: the first truthy of each over its choices (a choice
    without a `delta` offers its `text` as content)."""
    content = reasoning = None
    if chunk.choices:
        for choice in chunk.choices:
            delta = choice.delta
            if delta is not None:
                content = content or delta.content
                reasoning = reasoning or delta.reasoning_content
            elif choice.text:
                content = content or choice.text
    return content, reasoning


def _plain_texts(payload: bytes) -> tuple | None:
    """(content, reasoning) of a payload that decodes as a chunk saying nothing else (no error, no
    usage); each falsy one as None. None otherwise."""
    try:
        chunk = decode_chunk(payload)
    except msgspec.MsgspecError:
        return None
    if chunk.error or chunk.usage is not None:
        return None
    content, reasoning = _texts(chunk)
    return content or None, reasoning or None
