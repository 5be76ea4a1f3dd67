"""Metering of one proxied LLM call: a copy of the response body in, one CallRecord out.

The proxy writes every body piece to its client first and then hands it to `MeteredCall.feed`, the
per-chunk path: it decodes a copy of a compressed body, parses an event stream with the shared SSE
parser (opskit.core.sse) or keeps a non-streamed JSON body up to `JSON_METER_CAP`, and never raises
(it runs inside the upstream connection's data_received). A text chunk that fills its stream's learned
template is accounted without a JSON parse (opskit.core.stream_meter), exactly as a parse accounts it.
`MeteredCall.record` then turns what was seen into the CallRecord, with the error type the client's
outcome implies; it never raises either, so whatever a response holds, the call is counted exactly once.

Everything here reads a peer's bytes, so everything is bounded (DESIGN.md): a compressed piece is
decoded to at most `INFLATE_PER_PIECE` bytes (a gzip bomb costs a read no more than the largest
plain read would; the rest waits in the decoder for the next piece), decoding stops past
`JSON_METER_CAP` (non-streamed) or `STREAM_INFLATE_CAP` (streams) decoded bytes, and an SSE line or
event over the parser's `max_line` ends metering with the call counted `stream_broken` (an SDK fails
on such an event too). The client gets the upstream's bytes unchanged in every case.
"""

from __future__ import annotations

import math
import zlib
from time import perf_counter
from typing import Any

import msgspec

from opskit.core import records
from opskit.core.llm_json import MAX_ID_CHARS, completion_usage_and_id, loads_utf8
from opskit.core.records import CallRecord
from opskit.core.sse import SSEParser
from opskit.core.stream_meter import StreamMeter

SOURCE = "proxy"
JSON_METER_CAP = 4 * 1024 * 1024      # non-streamed bodies bigger than this are passed but not metered
INFLATE_PER_PIECE = 256 * 1024        # decoded bytes per body piece at most (asyncio reads up to 256 KiB)
STREAM_INFLATE_CAP = 64 * 1024 * 1024  # decoded bytes of one compressed stream metered at most
FINISH_INFLATE = JSON_METER_CAP       # decoded at the end from what the per-piece bound left waiting


def _float_header(headers, name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class _Request(msgspec.Struct, gc=False):
    model: Any = None


_decode_request = msgspec.json.Decoder(_Request).decode


def model_of(body: bytes) -> str | None:
    """The `model` of a JSON request body, or None (not JSON, nested too deep, no string model):
    the body is forwarded as it is either way, and the upstream judges it. Only `model` is built (a
    prompt's messages are checked and skipped); a body of another shape is parsed in full."""
    try:
        model = _decode_request(body).model
    except msgspec.MsgspecError:
        try:
            obj = loads_utf8(body)
        except (ValueError, RecursionError):
            return None
        model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) else None


class MeteredCall:
    """Metering state of one call; the per-chunk path is `feed` and nothing else."""

    __slots__ = ("t0", "model", "code", "error_type", "end", "streamed", "parser", "meter", "body",
                 "body_len", "decoder", "inflated", "inflate_cap", "overlong", "in_flight", "rl_requests",
                 "rl_tokens", "request_body", "request_id", "capture", "capture_left")

    def __init__(self, t0: float, capture: int = 0) -> None:
        self.t0 = t0
        self.request_body: bytes | None = None  # for the call log
        self.request_id: str | None = None      # the upstream's x-request-id header
        # a copy of a streamed body's first `capture` decoded bytes, for the call log's bodies
        self.capture: list[bytes] | None = [] if capture else None
        self.capture_left = capture
        self.model: str | None = None
        self.code = 0
        # Until the request goes upstream, a call that ends was ended by its client (it hung up, or the
        # drain cut its upload): nothing reached the API. The proxy says CONNECTION once it sends.
        self.error_type = records.CLIENT_DISCONNECT
        self.end: float | None = None
        self.streamed = False
        self.parser: SSEParser | None = None
        self.meter: StreamMeter | None = None
        self.body: list[bytes] | None = None
        self.body_len = 0
        self.decoder = None
        self.inflated = 0
        self.inflate_cap = JSON_METER_CAP
        self.overlong = False  # an SSE line or event over the parser's bound: the stream reads as broken
        self.in_flight = False  # announced to CallMetrics.started (once its request went upstream)
        self.rl_requests = self.rl_tokens = None

    def begin(self, status: int, h: dict[str, str]) -> None:
        """Response headers arrived (`h`: by lower-case name): pick the meter for the body."""
        self.code = status
        self.error_type = records.error_type_for_status(status)
        self.rl_requests = _float_header(h, "x-ratelimit-remaining-requests")
        self.rl_tokens = _float_header(h, "x-ratelimit-remaining-tokens")
        rid = h.get("x-request-id")
        self.request_id = rid[:MAX_ID_CHARS] if rid else None
        coding = h.get("content-encoding", "identity").strip().lower()
        if coding in ("gzip", "x-gzip"):
            self.decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self.decoder = zlib.decompressobj()
        elif coding != "identity":
            return  # a coding the meter cannot read: the bytes still pass, tokens stay unknown
        if h.get("content-type", "").startswith("text/event-stream"):
            self.streamed = True
            self.parser, self.meter = SSEParser(), StreamMeter(self.t0, templates=True)
            self.inflate_cap = STREAM_INFLATE_CAP
        else:
            self.body = []

    def feed(self, chunk: bytes, now: float) -> None:
        """Account one chunk that arrived at `now` (already written to the client). Never raises:
        it runs inside the upstream connection's data_received."""
        try:
            if self.decoder is not None:
                chunk = self._inflate(chunk)
            if self.parser is not None:
                if self.capture is not None and self.capture_left > 0:
                    self.capture.append(chunk[:self.capture_left])
                    self.capture_left -= len(chunk)
                parser, meter = self.parser, self.meter
                if meter.templates and parser.idle() and meter.on_event(chunk, now):
                    return  # the usual read: one whole event, a text chunk of the stream's template
                on_data = meter.on_data
                payload = parser.one_event(chunk)
                if payload is not None:  # one whole event, metered from its bytes
                    on_data(payload, now)
                    return
                for payload in parser.feed_lines(chunk):
                    on_data(payload, now)
                if parser.too_long:
                    self.overlong, self.parser, self.decoder = True, None, None
            elif self.body is not None:
                self.body_len += len(chunk)
                if self.body_len > JSON_METER_CAP:
                    self.body = self.decoder = None
                else:
                    self.body.append(chunk)
        except Exception:  # a corrupt coding: stop metering, keep relaying (tokens unknown)
            self.decoder = self.parser = self.meter = self.body = None

    def _inflate(self, chunk: bytes) -> bytes:
        """At most INFLATE_PER_PIECE decoded bytes; compressed input beyond them waits in the decoder."""
        d = self.decoder
        if d.unconsumed_tail:
            chunk = d.unconsumed_tail + chunk
        out = d.decompress(chunk, INFLATE_PER_PIECE)
        self.inflated += len(out)
        if self.inflated > self.inflate_cap:  # past the metering cap: stop decoding, tokens unknown
            self.decoder = self.parser = self.meter = self.body = None
            return b""
        return out

    def _finish(self, now: float) -> None:
        """Decode what the per-piece bound left waiting, up to FINISH_INFLATE more bytes."""
        budget = self.inflated + FINISH_INFLATE
        while self.decoder is not None and self.decoder.unconsumed_tail and self.inflated < budget:
            before = self.inflated
            self.feed(b"", now)
            if self.inflated == before:  # no progress (cannot happen with zlib; never loop on it)
                break
        if self.decoder is not None and self.decoder.unconsumed_tail:  # more than that: not metered
            self.decoder = self.parser = self.meter = self.body = None

    def fail(self, error_type: str) -> None:
        """The call failed after its headers; the first failure seen is the one recorded. A client that
        hangs up after `data: [DONE]` (SDKs close at it, before the chunked body's last bytes) got the
        whole stream: that is no failure."""
        if error_type == records.CLIENT_DISCONNECT and self.meter is not None and self.meter.done:
            return
        if self.error_type == records.OK:
            self.error_type = error_type

    def record(self, target: str, model: str) -> CallRecord:
        """The CallRecord of this call (call when it is over). Never raises: whatever the response
        held, the call is counted (without what metering saw, if metering itself failed)."""
        end = self.end if self.end is not None else perf_counter()
        rec = CallRecord(target=target, source=SOURCE, model=model, code=self.code, error_type=self.error_type,
                         duration_s=end - self.t0, streamed=self.streamed,
                         ratelimit_remaining_requests=self.rl_requests, ratelimit_remaining_tokens=self.rl_tokens,
                         request_id=self.request_id)
        try:
            self._result(rec, end)
        except Exception:  # a bug in metering must not lose the call: count it with unknown tokens
            rec.ttft_s = rec.ttfot_s = None
            rec.input_tokens = rec.output_tokens = rec.text_chunks = 0
            rec.cached_input_tokens = rec.reasoning_tokens = 0
            rec.tokens_from_usage = False
        return rec

    def _result(self, rec: CallRecord, end: float) -> None:
        if self.decoder is not None:
            self._finish(end)
        if self.meter is not None:
            self._stream_result(rec, end)
        elif self.body is not None:
            u, rid = completion_usage_and_id(b"".join(self.body))
            rec.input_tokens, rec.output_tokens, rec.tokens_from_usage = u.input, u.output, u.from_usage
            rec.cached_input_tokens, rec.reasoning_tokens = u.cached, u.reasoning
            rec.request_id = rec.request_id or rid or None
            if u.has_text and rec.ok:  # a duration and no TTFT: the first token came with the last
                rec.text_chunks = 1

    def _stream_result(self, rec: CallRecord, end: float) -> None:
        m = self.meter
        if self.parser is not None:
            for payload in self.parser.close():
                m.on_data(payload, end)
        rec.ttft_s, rec.ttfot_s, rec.text_chunks = m.ttft, m.ttfot, m.text_chunks
        rec.input_tokens, rec.output_tokens, rec.tokens_from_usage = m.tokens
        rec.cached_input_tokens, rec.reasoning_tokens = m.details
        rec.request_id = rec.request_id or m.response_id or None
        if self.code != 200 or rec.error_type not in (records.OK, records.CLIENT_DISCONNECT):
            return
        # A bad event comes first: a client that hangs up on it (an SDK fails on it) does not hide it.
        if m.malformed or self.overlong:
            rec.error_type = records.STREAM_BROKEN
        elif m.stream_error:
            rec.error_type = records.SERVER_ERROR
        elif rec.ok and not m.done:
            rec.error_type = records.STREAM_BROKEN
