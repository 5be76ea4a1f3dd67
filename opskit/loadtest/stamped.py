"""Reading a streamed HTTP body with the kernel's receive time of each read.

The client stamps every SSE event with the time its bytes arrived. Taking `perf_counter()` after the
read returns also counts however long this process took to get round to reading: a greenlet woken
behind others, a collection, a CPU slice lost to a neighbour. Under load those few stalls landed on
every stream being read at that moment (TTFT errors up to the length of the stall). Linux stamps
each received packet (`SO_TIMESTAMPNS`) and hands the stamp of the newest packet a read consumed to
`recvmsg`, so an event's time is when it reached this host, not when the client read it. A read that
holds several packets takes the newest one's stamp (never earlier than the truth); a read without a
stamp (other platforms, a clock step) falls back to `perf_counter()` after the read.

The stamp is on CLOCK_REALTIME; it becomes a `perf_counter()` reading through the age of the
packet (`time_ns()` now minus the stamp), measured right after the read, so a slewed or stepped wall
clock shifts nothing by more than that age.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Iterator

perf = time.perf_counter
SO_TIMESTAMPNS = 35 if sys.platform.startswith("linux") else None  # == SCM_TIMESTAMPNS; not in `socket`
_ANC = socket.CMSG_SPACE(16)
_TIMESPEC = struct.Struct("qq")
MAX_AGE_NS = 60 * 10 ** 9  # a stamp older than this is a clock step, not a queued packet


def enable(sock) -> bool:
    """Ask the kernel to stamp what `sock` (a plain or gevent socket) receives; False where it cannot."""
    if SO_TIMESTAMPNS is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except (OSError, AttributeError):
        return False
    return True


def stamp(anc: list) -> float:
    """The `perf_counter()` reading of the newest packet in a read's ancillary data, else now."""
    now_ns, now = time.time_ns(), perf()
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) == _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack(data)
            age = now_ns - (sec * 1_000_000_000 + nsec)
            if 0 <= age < MAX_AGE_NS:
                return now - age * 1e-9
            return now
    return now


def body_reads(resp) -> Iterator[tuple[bytes, float]]:
    """Yield a geventhttpclient response's body as it comes off the socket, with each read's time:
    one item per read, however many SSE events (chunked encoding undone by the response's parser).

    geventhttpclient's public readline() costs two calls and two parser feeds per SSE event, and the
    gevent socket's recv() tries the socket before waiting (a failed syscall and an exception per
    event); this waits for the socket first, reads it once with `recvmsg` (for the kernel stamp) and
    hands everything decoded so far to the caller. It falls back to readline() and `perf_counter()`
    if the libraries' internals change.
    """
    buf, gsock = getattr(resp, "_body_buffer", None), getattr(resp, "_sock", None)
    raw, event = getattr(gsock, "_sock", None), getattr(gsock, "_read_event", None)
    if not (isinstance(buf, bytearray) and hasattr(resp, "message_complete") and hasattr(raw, "recvmsg")
            and event is not None and hasattr(gsock, "_wait")):
        for line in iter(lambda: resp.readline(b"\n"), b""):
            yield line, perf()
        return
    stamped = enable(raw)
    if buf:  # what came with the headers: read before the stamps were asked for
        data = bytes(buf)
        del buf[:]
        yield data, perf()
    wait, feed = gsock._wait, resp.feed
    while not resp.message_complete:
        wait(event)
        try:
            if stamped:
                data, anc, _, _ = raw.recvmsg(65536, _ANC)
                now = stamp(anc)
            else:
                data, now = raw.recv(65536), perf()
        except BlockingIOError:  # woken with nothing to read after all
            continue
        if not data:
            raise ConnectionError("connection closed mid-body")
        feed(data)  # may complete the message, which hands the socket back to the pool
        if buf:
            data = bytes(buf)
            del buf[:]
            yield data, now
