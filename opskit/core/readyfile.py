"""The ready-file handshake between opskit's servers and whatever starts them.

A server started with `--ready-file PATH` (mock, exporter, receiver) writes one JSON object there once
its sockets listen: its real URLs (port 0 picks free ports) and pid. The starter waits for the file
instead of sleeping or guessing ports. Writes are atomic, so a reader sees nothing or all of it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path


class NotReady(Exception):
    """The child died, or did not write its ready file in time (one line)."""


def write(path: str | os.PathLike[str], info: dict) -> None:
    """Write `info` as JSON atomically (temp file + rename). Raises OSError."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, target)


def wait(path: str | os.PathLike[str], exited: Callable[[], str | None], timeout: float,
         poll_s: float = 0.02) -> dict:
    """The JSON a child wrote to `path`. `exited()` returns None while the child lives, else why it
    ended; NotReady is raised as soon as it has ended, or after `timeout` seconds."""
    target = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = target.read_text()
        except FileNotFoundError:
            text = ""
        if text:
            return json.loads(text)  # never partial: written by rename
        why = exited()
        if why is not None:
            raise NotReady(why)
        if time.monotonic() >= deadline:
            raise NotReady(f"did not write {target} within {timeout:g}s")
        time.sleep(poll_s)
