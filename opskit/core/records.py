"""Plain records passed from sources (proxy, probe, load test, NVML) to collectors and reports.

They are pure data: no I/O, no Prometheus. Times are in seconds from `time.perf_counter()`.
"""

from __future__ import annotations

from dataclasses import dataclass

# error_type values; "" means success. Kept in step with opskit.core.catalog.ERROR_TYPES.
OK = ""
RATE_LIMITED = "rate_limited"
CLIENT_ERROR = "client_error"
SERVER_ERROR = "server_error"
TIMEOUT = "timeout"
CONNECTION = "connection"
STREAM_BROKEN = "stream_broken"
CLIENT_DISCONNECT = "client_disconnect"


def error_type_for_status(code: int) -> str:
    """The error type an HTTP status implies (before anything goes wrong with the body)."""
    if code == 429:
        return RATE_LIMITED
    if 400 <= code < 500:
        return CLIENT_ERROR
    if code >= 500:
        return SERVER_ERROR
    return OK


@dataclass(slots=True)
class CallRecord:
    """One LLM API call as observed by a client or the proxy.

    `code` is the HTTP status, 0 when no response arrived. `ttft_s` is None when no text arrived
    and for every non-streamed call: such a call has a duration and no TTFT or TPOT (DESIGN.md, as
    the OpenTelemetry GenAI conventions say). `tokens_from_usage` says whether the token counts came
    from the server's `usage` or from counting text chunks.
    """

    target: str
    source: str
    model: str
    code: int
    error_type: str
    duration_s: float
    ttft_s: float | None = None
    ttfot_s: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0   # part of input_tokens: read from the provider's prompt cache
    reasoning_tokens: int = 0      # part of output_tokens: spent on reasoning
    tokens_from_usage: bool = False
    streamed: bool = False
    text_chunks: int = 0
    ratelimit_remaining_requests: float | None = None
    ratelimit_remaining_tokens: float | None = None
    request_id: str | None = None  # the upstream's x-request-id header, else the response body's `id`

    @property
    def stream_label(self) -> str:
        """The bounded `stream` label: "true" for a streamed (SSE/WebSocket) response, else "false"."""
        return "true" if self.streamed else "false"

    @property
    def ok(self) -> bool:
        return self.error_type == OK

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (duration - TTFT) / (output tokens - 1)."""
        if self.ttft_s is None or self.output_tokens < 2 or not self.ok or not self.streamed:
            return None
        return max(0.0, self.duration_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(slots=True, frozen=True)
class GpuSample:
    """One GPU read at scrape time. `index` is the host index as a string (the `gpu` label; `0:1` for
    MIG device 1 of GPU 0, whose parent's UUID is `parent_uuid`, empty for a whole GPU)."""

    index: str
    uuid: str
    name: str
    utilization_ratio: float | None
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    temperature_celsius: float | None
    power_watts: float | None
    parent_uuid: str = ""
