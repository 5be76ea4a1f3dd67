"""The call log: one JSON line per metered call, written off the event loop (`opskit exporter --call-log DIR`).

The proxy hands each finished call to `CallLog.submit`, which only appends a tuple to a bounded
queue: parsing the request, hashing and writing happen on one writer thread, so a slow or full disk
never stalls a stream. When the queue is full the record is dropped and counted
(`opskit_call_log_dropped_total{reason="queue_full"}`, and logged at most every 10 s); a write that
fails (disk full, directory gone) is counted with reason `write_error`. The writer drains the queue
every `FLUSH_EVERY_S` and on `close()`, so a clean stop (SIGTERM) loses no record.

Files are `calls-YYYYMMDDTHHMMSSZ[SUFFIX].jsonl` in DIR, named by the time they were opened (UTC).
A file is closed when it reaches `rotate_bytes` or is `rotate_s` old, then gzip-compressed to
`.jsonl.gz`. Closed files older than `retention_days`, and the oldest ones while the directory holds
more than `max_bytes`, are deleted. The record format is in opskit.sidecar.call_log_record and
docs/call-log.md.

The hashing key (caller and prompt fingerprints) comes from the environment (OPSKIT_CALL_LOG_KEY), a
key file, or else `DIR/.call-log.key`, created with mode 0600 on first use; it is never logged.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

from opskit.core import catalog
from opskit.core.records import CallRecord
from opskit.sidecar import call_log_record
from opskit.sidecar.http_guard import Throttle

log = logging.getLogger("opskit.sidecar.call_log")

KEY_ENV = "OPSKIT_CALL_LOG_KEY"
KEY_FILE = ".call-log.key"
FLUSH_EVERY_S = 0.2
SWEEP_EVERY_S = 600.0
CAPTURE_BYTES = 1024 * 1024   # streamed response bytes kept per call for --call-log-bodies
FILE_RE = re.compile(r"^calls-\d{8}T\d{6}Z.*\.jsonl(\.gz)?$")


def _private(path, flags: int) -> int:
    """Open with mode 0600: the log describes who called what (and, with bodies, what they said)."""
    return os.open(path, flags, 0o600)


class CallLogError(Exception):
    """The call log cannot start (directory or key file unusable): one line for the user."""


@dataclass(frozen=True)
class CallLogOptions:
    """What `--call-log*` asked for."""

    directory: Path
    bodies: bool = False
    retention_days: float = 90.0
    max_bytes: int = 10 * 1024 ** 3
    rotate_bytes: int = 64 * 1024 ** 2
    rotate_s: float = 3600.0
    queue_size: int = 20_000
    key_file: Path | None = None
    suffix: str = ""  # file name suffix: one writer per process, so each process needs its own


def load_key(opts: CallLogOptions, env=os.environ) -> bytes:
    """The deployment's hashing key: $OPSKIT_CALL_LOG_KEY, the key file, or DIR/.call-log.key (made
    with 32 random bytes and mode 0600 when missing). CallLogError names the file, never the key."""
    if env.get(KEY_ENV):
        return env[KEY_ENV].encode()
    path = opts.key_file or opts.directory / KEY_FILE
    try:
        if opts.key_file is None and not path.exists():
            # written whole under a temporary name, then linked into place: processes starting
            # together (proxy workers) all read the one key that won, never a half-written file
            tmp = path.with_name(f"{KEY_FILE}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        key = path.read_bytes().strip()
    except OSError as exc:
        raise CallLogError(f"cannot read or create the call-log key file {path}: {exc.strerror or exc}") from None
    if not key:
        raise CallLogError(f"the call-log key file {path} is empty")
    return key


class CallLog:
    """A running call log; `submit` on the event loop, everything else on the writer thread."""

    def __init__(self, opts: CallLogOptions, target_url: str, registry, env=os.environ,
                 clock=time.time) -> None:
        from opskit.sidecar.call_metrics import make

        self.opts, self.bodies = opts, opts.bodies
        self.capture = CAPTURE_BYTES if opts.bodies else 0
        try:
            opts.directory.mkdir(parents=True, exist_ok=True)
            probe = opts.directory / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CallLogError(f"cannot write to the call-log directory {opts.directory}: "
                               f"{exc.strerror or exc}") from None
        self._key = load_key(opts, env)
        self._target = target_url
        self._clock = clock
        self._queue: collections.deque = collections.deque()
        dropped = make(catalog.CALL_LOG_DROPPED, registry)
        self._dropped_full, self._dropped_write = dropped.labels("queue_full"), dropped.labels("write_error")
        self._written = make(catalog.CALL_LOG_RECORDS, registry)
        self.counters = (dropped, self._written)  # proxy workers' counts merge into the exporter's
        self._full_log, self._write_log = Throttle(), Throttle()
        self._stop = threading.Event()
        self._file = None
        self._path: Path | None = None
        self._size = 0
        self._opened = 0.0
        self._last_sweep = 0.0
        self._thread = threading.Thread(target=self._run, name="call-log", daemon=True)

    def start(self) -> None:
        """Compress files an earlier run left open, apply retention, start the writer thread."""
        for path in self._files():
            if path.suffix == ".jsonl" and path.name.endswith(f"{self.opts.suffix}.jsonl"):
                self._compress(path)
        self._sweep()
        self._thread.start()

    # --- event loop side ---

    def submit(self, rec: CallRecord, call, auth: str | None) -> None:
        """Queue the record of a finished call (`call` is its MeteredCall); never blocks or raises."""
        if len(self._queue) >= self.opts.queue_size:
            self._dropped_full.inc()
            held = self._full_log.take()
            if held is not None:
                log.warning("call log: queue full (%d records), records dropped%s", self.opts.queue_size,
                            f" ({held} more since the last such line)" if held else "")
            return
        ts = self._clock() - (perf_counter() - call.t0)
        response = None
        if self.bodies:
            response = call.capture if rec.streamed else call.body
        self._queue.append((rec, ts, call.model, call.request_body, auth, response))

    async def close(self) -> None:
        """Write every queued record, close and compress the file (waits on a thread, not the loop)."""
        import asyncio

        self._stop.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    def close_sync(self) -> None:
        """As close(), for callers without an event loop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    # --- writer thread ---

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(FLUSH_EVERY_S)
            try:
                self._drain()
                self._maintain(self._clock())
            except Exception as exc:  # never let the writer die: the next round tries again
                log.error("call log: %s: %s", type(exc).__name__, exc)
            if stopping and not self._queue:
                break
        try:
            self._rotate()
            self._sweep()
        except Exception as exc:
            log.error("call log: closing: %s: %s", type(exc).__name__, exc)

    def _drain(self) -> None:
        lines, queue = [], self._queue
        while queue:
            rec, ts, model, body, auth, response = queue.popleft()
            try:
                obj = call_log_record.build(rec, ts, self._target, model, body, auth, self._key, response,
                                            self.bodies)
                lines.append(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
            except Exception as exc:  # a bug building one record: count it, keep the others
                self._write_failed(1, exc)
            if len(lines) >= 1000:
                self._write(lines)
                lines = []
        if lines:
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
        try:
            if self._file is None:
                self._open()
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            self._write_failed(len(lines), exc)
            self._close_quietly()
            return
        self._size += len(data)
        self._written.inc(len(lines))

    def _write_failed(self, n: int, exc: BaseException) -> None:
        self._dropped_write.inc(n)
        held = self._write_log.take()
        if held is not None:
            log.error("call log: %d records not written: %s%s", n, getattr(exc, "strerror", None) or exc,
                      f" ({held} more failures since the last such line)" if held else "")

    def _open(self) -> None:
        now = self._clock()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        path, n = self.opts.directory / f"calls-{stamp}{self.opts.suffix}.jsonl", 1
        while path.exists() or path.with_name(path.name + ".gz").exists():  # two files in one second
            path = self.opts.directory / f"calls-{stamp}{self.opts.suffix}-{n}.jsonl"
            n += 1
        self._file = open(path, "ab", opener=_private)  # noqa: SIM115 (held open across writes)
        self._path, self._size, self._opened = path, 0, now

    def _close_quietly(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None

    def _maintain(self, now: float) -> None:
        if self._file is not None and (self._size >= self.opts.rotate_bytes or now - self._opened >= self.opts.rotate_s):
            self._rotate()
            self._sweep()
        elif now - self._last_sweep >= SWEEP_EVERY_S:
            self._sweep()

    def _rotate(self) -> None:
        """Close the current file and compress it."""
        if self._file is None:
            return
        self._close_quietly()
        path, self._path = self._path, None
        self._compress(path)

    def _compress(self, path: Path) -> None:
        gz = path.with_name(path.name + ".gz")
        tmp = path.with_name(path.name + ".gz.tmp")
        try:
            with open(path, "rb") as src, open(tmp, "wb", opener=_private) as raw, \
                    gzip.GzipFile(path.name, "wb", 6, raw) as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
            os.replace(tmp, gz)
            path.unlink()
        except OSError as exc:  # left as .jsonl: still readable, compressed at the next start
            log.error("call log: cannot compress %s: %s", path.name, exc.strerror or exc)
            tmp.unlink(missing_ok=True)

    def _files(self) -> list[Path]:
        try:
            return [p for p in self.opts.directory.iterdir() if FILE_RE.match(p.name)]
        except OSError:
            return []

    def _sweep(self) -> None:
        """Delete closed files past the retention time, then the oldest while over the disk cap."""
        now = self._clock()
        self._last_sweep = now
        horizon = now - self.opts.retention_days * 86400
        files = []
        for path in self._files():
            try:
                st = path.stat()
            except OSError:
                continue
            files.append((st.st_mtime, path.name, path, st.st_size))
        files.sort()
        total = sum(f[3] for f in files)
        for mtime, _, path, size in files:
            if path.suffix == ".jsonl":  # open (this process's or another worker's): never deleted
                continue
            if mtime < horizon or total > self.opts.max_bytes:
                try:
                    path.unlink()
                except OSError:
                    continue
                total -= size
