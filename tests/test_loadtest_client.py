"""The load-test client (opskit.loadtest.client) against a stdlib server on loopback that puts garbage
in `usage`: every request still yields its row, counted as the success it was, tokens unknown.

ChatClient runs on gevent's sockets; no monkey-patching is needed here because the server is a plain
thread and the client's calls block the (otherwise idle) gevent hub in this thread.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from opskit.loadtest.client import ChatClient


class _Garbage(BaseHTTPRequestHandler):
    usage = b"{}"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        if "event-stream" in self.headers["Accept"]:  # the client asks for a stream this way
            body = (b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
                    b'data: {"choices": [], "usage": ' + self.usage + b'}\n\ndata: [DONE]\n\n')
            ctype = "text/event-stream"
        else:
            body = b'{"choices": [{"message": {"content": "hi"}}], "usage": ' + self.usage + b"}"
            ctype = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("value", ['"x"', "Infinity", "[1]", "-1", "1e400", "true", "10000000000000000000000"])
def test_garbage_usage_never_loses_a_request(value):
    handler = type("H", (_Garbage,), {"usage": b'{"prompt_tokens": ' + value.encode() + b', "completion_tokens": 3}'})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = ChatClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5)
    try:
        for stream in (False, True):
            row = client.call({"model": "m", "messages": [], "stream": stream})
            assert row["status"] == 200 and row["error_type"] == "", row
            assert row["tokens_from_usage"] is False and row["input_tokens"] == 0
            # the text was still seen: timed when streamed; a non-streamed call has no TTFT
            assert row["text_chunks"] >= 1 and (row["ttft_s"] is not None) == stream
    finally:
        client.close()
        server.shutdown()
        server.server_close()
