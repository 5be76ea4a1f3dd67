"""Shared fixtures: real servers on loopback, started as subprocesses and always stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from opskit.core import readyfile

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class MockServer:
    """A running `opskit mock`: `url` is its root (append /v1 for SDKs), `admin_url` its admin root."""

    url: str
    admin_url: str
    proc: subprocess.Popen

    @property
    def api(self) -> str:
        return self.url + "/v1"


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> dict:
    """Wait until a process writes its JSON ready file; fail with its stderr if it dies first."""
    def exited() -> str | None:
        if proc.poll() is None:
            return None
        err = proc.stderr.read().decode() if proc.stderr else ""
        return f"process exited {proc.returncode} before it was ready: {err[-2000:]}"

    return readyfile.wait(path, exited, timeout)


def running_under(directory: Path) -> list[str]:
    """`pid: command line` of every live (not zombie) process whose command line names a path inside
    `directory`: each helper a command starts names its ready file, config or output there, so this
    finds them whether or not the command recorded them, and in whatever session they run."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rpartition(") ")[2][:1]
        except OSError:  # gone meanwhile
            continue
        if f"{directory}/" in argv and state not in ("Z", ""):
            found.append(f"{entry.name}: {argv[:200]}")
    return found


def kill_leftovers(directory: Path) -> None:
    """SIGKILL what running_under(directory) finds, so a failing test leaves nothing behind either."""
    for line in running_under(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.partition(":")[0]), signal.SIGKILL)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def _own_state_home(tmp_path, monkeypatch):
    """`opskit stack up` notes its state dir under $XDG_STATE_HOME: never the developer's own."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture
def start_mock(tmp_path):
    """Factory: start_mock(*flags) -> MockServer, stopped at teardown."""
    procs: list[subprocess.Popen] = []

    def start(*flags: str) -> MockServer:
        ready = tmp_path / f"mock-ready-{len(procs)}.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "opskit", "mock", "--listen", "127.0.0.1:0", "--ready-file", str(ready), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
        )
        procs.append(proc)
        info = wait_for_file(ready, proc)
        return MockServer(info["url"], info["admin_url"], proc)

    yield start
    for p in procs:
        stop(p)


@pytest.fixture
def mock_server(start_mock) -> MockServer:
    """One mock with default settings (fast, no faults)."""
    return start_mock()


def need_binary(name: str) -> str:
    """Path of a system binary, or skip the test naming the missing package."""
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed (make install installs it from Debian)")
    return path


@pytest.fixture
def clean_env(monkeypatch):
    """An environment without opskit's variables, so tests don't see the developer's settings."""
    for var in list(os.environ):
        if var.startswith("OPSKIT_"):
            monkeypatch.delenv(var)


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory) -> Path:
    """The fake libnvidia-ml.so.1 (opskit/live/fakenvml), built once per session; skips without gcc."""
    from opskit.live.fakenvml import build_fake_nvml

    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("gcc not installed (needed to build the fake NVML library)")
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


@pytest.fixture
def state(tmp_path, monkeypatch):
    """Path of this test's fake-NVML state file, exported to the fake through $FAKE_NVML_STATE."""
    path = tmp_path / "gpus.state"
    monkeypatch.setenv("FAKE_NVML_STATE", str(path))
    return path


@pytest.fixture
def collect(fake_nvml):
    """Factory: collect(**kw) -> (registry, collector) on the fake library, closed at teardown."""
    from prometheus_client import CollectorRegistry

    from opskit.sidecar import gpu

    made = []

    def make(**kw):
        kw.setdefault("lib_path", str(fake_nvml))
        c = gpu.GpuCollector(**kw)
        reg = CollectorRegistry()
        reg.register(c)
        made.append(c)
        return reg, c

    yield make
    for c in made:
        c.close()
