"""Kernel receive stamps in the load-test client (opskit.loadtest.stamped), the default CPU placement of a
load test's processes (opskit.loadtest.placement) and the users' staggered start.

The client runs on gevent's sockets without monkey-patching (as in test_loadtest_client.py): the server
is a plain thread, and a blocking time.sleep() in the client's thread is a stall of its event loop.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from opskit.core.stream_meter import StreamMeter
from opskit.loadtest import client as client_mod
from opskit.loadtest import placement, runner, stamped
from opskit.loadtest.client import ChatClient

linux_only = pytest.mark.skipif(stamped.SO_TIMESTAMPNS is None, reason="SO_TIMESTAMPNS is Linux's")
GAP_S = 0.05
STALL_S = 0.25


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class _Paced(BaseHTTPRequestHandler):
    """A chunked SSE stream: role chunk at once, then two text chunks GAP_S apart; records send times."""

    protocol_version = "HTTP/1.1"
    sent: list[float] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(_chunk(b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'))
        self.wfile.flush()
        for word in (b"one", b"two"):
            time.sleep(GAP_S)
            self.wfile.write(_chunk(b'data: {"choices": [{"delta": {"content": "%b"}}]}\n\n' % word))
            self.wfile.flush()
            self.sent.append(time.perf_counter())
        self.wfile.write(_chunk(b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\n'
                                b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


class _Stalling(StreamMeter):
    """A meter whose first text chunk stalls the whole thread, as a busy event loop would."""

    __slots__ = ()

    def _text(self, now: float, is_output: bool) -> None:
        if self.first_token is None:
            time.sleep(STALL_S)
        super()._text(now, is_output)


@linux_only
def test_a_stalled_client_still_times_each_chunk_at_its_arrival(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Paced,), {"sent": []}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(client_mod, "StreamMeter", _Stalling)
    client = ChatClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5)
    try:
        for _ in range(2):  # a fresh connection, then the same one again from the pool
            server.RequestHandlerClass.sent.clear()
            row = client.call({"model": "m", "messages": [], "stream": True})
            assert row["error_type"] == "" and row["text_chunks"] == 2, row
            first, second = server.RequestHandlerClass.sent
            # the second chunk was read STALL_S after the first; it arrived GAP_S after it, and says so
            assert abs(row["itl"][0] - (second - first)) < 0.01, (row["itl"], second - first)
            assert abs(row["t_sched"] + row["ttft_s"] - first) < 0.01
    finally:
        client.close()
        server.shutdown()
        server.server_close()


@linux_only
def test_stamp_is_the_packets_age_before_now_and_ignores_nonsense():
    srv = socket.create_server(("127.0.0.1", 0))
    b = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    srv.close()
    try:
        assert stamped.enable(b)
        # The kernel turns receive stamps on for the whole stack lazily (a deferred static key) when the
        # first socket asks: packets right after may come unstamped (read as "now" by stamp()). Wait for it.
        for _ in range(100):
            a.sendall(b"w")
            if b.recvmsg(16, stamped._ANC)[1]:
                break
            time.sleep(0.01)
        sent = time.perf_counter()
        a.sendall(b"x")
        time.sleep(0.05)
        _, anc, _, _ = b.recvmsg(16, stamped._ANC)
        t = stamped.stamp(anc)
        after = time.perf_counter()
        assert anc  # the kernel's receive time came with the packet
        # within the exchange (1 ms: converting the kernel's clock). Usually right after the send, but on a
        # saturated machine the kernel may take the packet in late, so no tighter bound holds everywhere.
        assert sent - 0.001 <= t <= after
    finally:
        a.close()
        b.close()
    now = time.perf_counter()
    assert stamped.stamp([]) >= now  # no stamp: the time of the read
    future = stamped._TIMESPEC.pack(*divmod(time.time_ns() + 10 ** 9, 10 ** 9))
    assert stamped.stamp([(socket.SOL_SOCKET, stamped.SO_TIMESTAMPNS, future)]) >= now  # a clock step


def test_placement_keeps_helpers_and_locust_apart():
    assert placement.plan({0}) is None
    two = placement.plan({0, 1})
    assert two == placement.Placement(helpers=frozenset({1}), load=frozenset({0}))
    four = placement.plan({0, 1, 2, 3})
    assert four.helpers == {3} and four.load == {0, 1, 2}
    assert not placement.pin(os.getpid(), None)


@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="needs two cores")
def test_the_embedded_mock_runs_on_its_own_core_and_locust_is_told_the_rest(tmp_path):
    plan = placement.plan()
    target = runner.open_target(runner.Options(proxy=False), tmp_path, None)
    try:
        (mock,) = target.children
        assert os.sched_getaffinity(mock.pid) == plan.helpers and target.load_cpus == plan.load
    finally:
        target.close()
    target = runner.open_target(runner.Options(proxy=False, placement=False), tmp_path / "off", None)
    try:
        assert os.sched_getaffinity(target.children[0].pid) == os.sched_getaffinity(0)
        assert target.load_cpus is None
    finally:
        target.close()
    # a real target and no proxy: Locust runs alone, so it is left where the OS puts it
    assert runner.open_target(runner.Options(proxy=False), tmp_path / "real", "http://127.0.0.1:9").load_cpus is None
    # more Locust processes than the cores left to them: they may use every core
    target = runner.open_target(runner.Options(proxy=False, processes=len(plan.load) + 1), tmp_path / "many", None)
    try:
        assert os.sched_getaffinity(target.children[0].pid) == plan.helpers and target.load_cpus is None
    finally:
        target.close()


def test_pin_confines_a_child_and_survives_one_that_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        core = min(os.sched_getaffinity(0))
        assert placement.pin(child.pid, frozenset({core}))
        assert os.sched_getaffinity(child.pid) == {core}
    finally:
        child.kill()
        child.wait()
    assert not placement.pin(child.pid, frozenset({core}))  # reaped: no such process


def test_users_start_ten_ms_apart_within_the_first_second():
    # users.py imports locust (gevent's monkey-patching): read the function in a child process
    code = ("from opskit.loadtest.users import start_delay as d; "
            "print(d(0, 100), d(1, 100), d(99, 100), d(1, 1000), d(999, 1000), d(5, 10), d(1, 1000, 4))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert [float(x) for x in out.stdout.split()] == pytest.approx([0, 0.01, 0.99, 0.001, 0.999, 0.05, 0.004])


def test_reusing_a_pooled_connection_neither_yields_nor_takes_a_closed_one():
    import gevent

    srv = socket.create_server(("127.0.0.1", 0))
    conn = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    srv.close()
    try:
        ran: list[int] = []
        gevent.spawn(ran.append, 1)  # runs at the next yield to the hub
        assert client_mod._alive(conn) and ran == []  # idle and open; the request goes out before others run
        peer.close()
        time.sleep(0.05)
        assert not client_mod._alive(conn)  # the server closed it: a new connection is made instead
    finally:
        conn.close()


@pytest.mark.skipif(placement._SCHED_SETATTR is None, reason="sched_setattr numbers known for x86_64/aarch64")
def test_placed_processes_ask_for_a_short_scheduler_slice():
    import ctypes

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert placement.pin(child.pid, frozenset(os.sched_getaffinity(0)))
        buf = ctypes.create_string_buffer(placement._SCHED_ATTR.size)
        getattr_nr = placement._SCHED_SETATTR + 1  # sched_getattr follows sched_setattr on both
        assert ctypes.CDLL(None).syscall(getattr_nr, child.pid, buf, placement._SCHED_ATTR.size, 0) == 0
        size, policy, _, nice, _, runtime, *_ = placement._SCHED_ATTR.unpack(buf.raw)
        assert (policy, nice) == (0, os.getpriority(os.PRIO_PROCESS, child.pid))  # SCHED_OTHER, nice kept
        if runtime:  # kernels before 6.12 report no slice of SCHED_OTHER tasks
            assert runtime == placement.SLICE_NS
    finally:
        child.kill()
        child.wait()
