"""streaming: concurrent streaming chats (SSE, or the mock's WebSocket transport with --transport ws).

Each user streams one chat after another. opskit's log gives TTFT, time to first output token
(reasoning models), inter-token latency, TPOT and output tokens/s per request and in aggregate.
"""

from opskit.loadtest.users import StreamingUser


class Streaming(StreamingUser):
    """One streaming chat after another."""
