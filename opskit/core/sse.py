"""Incremental Server-Sent Events parsing. Pure code, no I/O.

`SSEParser.feed()` takes bytes as they arrive (several events in one read, one event split across
reads, `\\r\\n` or `\\r` line endings, `:` keep-alive comments) and returns the data payloads of the
events it completed; it never holds more than one unfinished event, and that one at most `max_line`
bytes: a peer's bytes are bounded (DESIGN.md), so a longer line or event ends the parse (`too_long`)
and the stream reads as broken. What the payloads of an LLM stream say is opskit.core.stream_meter's
(timings, tokens) and opskit.core.llm_json's (the JSON shapes) business.
"""

from __future__ import annotations

DONE = "[DONE]"
DONE_BYTES = b"[DONE]"
MAX_LINE = 1024 * 1024    # an SSE line (or event) longer than this ends the parse: no real chunk is near it
ONE_EVENT_MAX = 16 * 1024  # a longer read is parsed line by line (not copied whole first: reads of many events)


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
                or self._data or self._pending_cr):  # (the last three: not idle(), without a call)
            return None
        payload = chunk[6:-2]  # (10, 13: LF, CR; `in` with an int is a memchr, and parses no arguments)
        return payload if 10 not in payload and 13 not in payload else None

    def idle(self) -> bool:
        """Nothing of an earlier read is held: the next read starts at an event's first byte."""
        return not (self._tail or self._data or self._pending_cr)

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
