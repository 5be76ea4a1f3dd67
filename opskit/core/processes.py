"""Process supervision for the local stack and the load test: start detached children, wait until they
are ready, and stop them again, whole process group and all.

Each child runs in its own session (so its process group id is its pid); stopping it signals the
group, which also takes down anything it forked. A child is identified by pid plus its start time
from /proc, so a recycled pid is never mistaken for (and never killed as) one of ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from opskit.core import readyfile


class SuperviseError(Exception):
    """A child could not be started or did not become ready; the message is one line."""


@dataclass
class Child:
    """A detached child process: its pid (= process group id), start time and log file."""

    name: str
    pid: int
    start_time: int
    log: str

    def to_json(self) -> dict:
        """As recorded in a state file."""
        return asdict(self)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for binaries that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has finished; it only waits to be reaped
        return None
    return int(fields[19])


def alive(child: Child) -> bool:
    """True while the child (the same process, not a recycled pid) is running."""
    return proc_start_time(child.pid) == child.start_time


@contextlib.contextmanager
def signals_held(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT wait; at its end each one caught is raised again, to the
    handler that was in place (sigterm_unwinds' SystemExit, Ctrl-C's KeyboardInterrupt).

    For steps that must not be cut in half: a child started in its own session but not yet recorded
    outlived an interrupted `opskit stack up`, since nothing knew to stop it. A Python-level handler
    (not a blocked signal mask) holds them, so the children started here do not inherit a mask that
    would make them deaf to SIGTERM. Outside the main thread, where handlers cannot be set, it holds nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum, frame):
        caught.append(signum)

    previous = {}
    for sig in signums:
        if signal.getsignal(sig) is not None:  # None: a handler set outside Python, which cannot be restored
            previous[sig] = signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: str | os.PathLike[str] | None = None, into: list[Child] | None = None) -> tuple[Child, subprocess.Popen]:
    """Start `argv` detached in its own session, stdout and stderr appended to `log`, and append it to
    `into` (the list its caller stops) in a step SIGTERM cannot split (signals_held)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out, signals_held():
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=cwd, start_new_session=True)
        except OSError as exc:
            raise SuperviseError(f"{name}: cannot run {argv[0]}: {exc.strerror}") from None
        started = proc_start_time(proc.pid)
        child = Child(name, proc.pid, started if started is not None else -1, str(log))
        if into is not None:
            into.append(child)
    return child, proc


def tail(log: str | os.PathLike[str], lines: int = 3) -> str:
    """The last non-empty lines of a log file, joined on one line (for one-line error messages)."""
    try:
        text = [x.strip() for x in Path(log).read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def log_tail(child: Child, lines: int = 3) -> str:
    """The last lines of a child's log, joined on one line."""
    return tail(child.log, lines)


def _died(child: Child, proc: subprocess.Popen | None) -> SuperviseError | None:
    if proc is not None and proc.poll() is not None or proc is None and not alive(child):
        code = f" with status {proc.returncode}" if proc is not None else ""
        return SuperviseError(f"{child.name} exited{code} before it was ready: {log_tail(child)}")
    return None


def wait_ready_file(child: Child, proc: subprocess.Popen | None, path: Path, timeout: float) -> dict:
    """Wait for the child to write its JSON ready file; error early if it dies first."""
    def exited() -> str | None:
        err = _died(child, proc)
        return None if err is None else str(err)

    try:
        return readyfile.wait(path, exited, timeout, poll_s=0.05)
    except readyfile.NotReady as exc:
        msg = str(exc)
        raise SuperviseError(msg if msg.startswith(child.name) else f"{child.name} {msg}: {log_tail(child)}") from None


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (OSError, urllib.error.URLError, ValueError):
        return False


def wait_http(child: Child, proc: subprocess.Popen | None, url: str, timeout: float) -> None:
    """Poll `url` until it answers 2xx; error early if the child dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url, timeout=1.0):
            return
        if err := _died(child, proc):
            raise err
        time.sleep(0.1)
    raise SuperviseError(f"{child.name} not ready at {url} within {timeout:.0f}s: {log_tail(child)}")


def _reap(pid: int) -> None:
    # Reap our own children so they do not linger as zombies; others are reaped by init.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_gone(child: Child, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(child.pid)
        if not alive(child):
            return True
        time.sleep(0.05)
    return False


def stop(child: Child, timeout: float = 10.0) -> bool:
    """SIGTERM the child's process group, SIGKILL it after `timeout`; True if it was running."""
    if not alive(child):
        _reap(child.pid)
        return False
    _signal_group(child.pid, signal.SIGTERM)
    if not _wait_gone(child, timeout):
        _signal_group(child.pid, signal.SIGKILL)
        _wait_gone(child, 5.0)
    # Members of the group that outlived its leader (a worker the leader forked) get SIGKILL too.
    _signal_group(child.pid, signal.SIGKILL)
    return True


def start_attached(argv: list[str], orders: bytes, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start `argv` as a child that shares this process's group and stderr and never outlives it.

    Its stdin is a pipe that only this process holds open: `orders` are written to it first, and the
    child sees EOF there once its parent is gone, however the parent died (the child must stop on that
    EOF). `pass_fds` are inherited (such as a shared memory segment); no other descriptor is.
    """
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=pass_fds)
    except OSError as exc:
        raise SuperviseError(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        proc.stdin.write(orders)
        proc.stdin.flush()
    except OSError:  # it died at once: its exit status tells the caller
        pass
    return proc


async def wait_exit(proc: subprocess.Popen) -> int:
    """The exit status of a child, awaited on the running event loop (a pidfd where Linux has one,
    else a thread blocked in wait)."""
    import asyncio

    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd here, or already reaped
        return await loop.run_in_executor(None, proc.wait)
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()


class Backoff:
    """The delay before restarting a child that exited: none after a run of `stable_s` or more, else
    `first`, doubling for each quick exit in a row up to `most` (a child that cannot start must not
    spin the CPU)."""

    def __init__(self, first: float = 0.5, most: float = 30.0, stable_s: float = 60.0) -> None:
        self.first, self.most, self.stable_s = first, most, stable_s
        self.delay = 0.0

    def after(self, ran_s: float) -> float:
        """The delay before the next start of a child that ran `ran_s` seconds."""
        if ran_s >= self.stable_s:
            self.delay = 0.0
        else:
            self.delay = self.first if self.delay == 0 else min(self.most, self.delay * 2)
        return self.delay
