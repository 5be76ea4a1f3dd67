"""The `--call-log*` flags of `opskit exporter`, turned into opskit.sidecar.call_log.CallLogOptions."""

from __future__ import annotations

from pathlib import Path

import click

from opskit.core.cli_helpers import FiniteRange
from opskit.sidecar.call_log import KEY_ENV, KEY_FILE, CallLogOptions

_D = CallLogOptions(Path("."))


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A byte count: 1000000, 64M, 10G (binary units: K=1024)."""
    if value is None:
        return None
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}.get(text[-1:], 1)
    try:
        n = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size such as 500M or 10G") from None
    if n < 1024:
        raise click.BadParameter(f"{value!r}: at least 1K")
    return n


def call_log_options(f):
    """Add the call-log flags to a click command (they arrive as keyword arguments)."""
    opts = [
        click.option("--call-log", "call_log_dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Write one JSON line per proxied call (time, model, status, latency, tokens, request id, "
                     "caller and prompt-prefix fingerprints; no text) to files in this directory "
                     "(format: docs/call-log.md). Needs --proxy-listen."),
        click.option("--call-log-bodies", is_flag=True,
                     help="SENSITIVE: also write each call's prompt messages and completion text to the call log. "
                     "Off by default; the files then hold whatever users send, so protect and expire them."),
        click.option("--call-log-retention-days", type=FiniteRange(min=0, min_open=True),
                     default=_D.retention_days, show_default=True,
                     help="Delete call-log files older than this."),
        click.option("--call-log-max-bytes", callback=_size, default="10G", show_default=True,
                     help="Disk cap of the call-log directory: the oldest files are deleted beyond it."),
        click.option("--call-log-rotate-bytes", callback=_size, default="64M", show_default=True,
                     help="Start a new call-log file (and gzip the old one) at this size."),
        click.option("--call-log-rotate-s", type=FiniteRange(min=1), default=_D.rotate_s, show_default=True,
                     help="Start a new call-log file (and gzip the old one) after this many seconds."),
        click.option("--call-log-queue", type=click.IntRange(min=1), default=_D.queue_size, show_default=True,
                     help="Records waiting for the writer at most; beyond it they are dropped and counted in "
                     "opskit_call_log_dropped_total (the proxy never waits for the disk)."),
        click.option("--call-log-key-file", type=click.Path(dir_okay=False, path_type=Path),
                     help=f"Key for the caller and prompt hashes (default: ${KEY_ENV}, else DIR/{KEY_FILE}, "
                     "created with mode 0600). Keep it to compare fingerprints across restarts."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def call_log_from_flags(call_log_dir, call_log_bodies, call_log_retention_days, call_log_max_bytes,
                        call_log_rotate_bytes, call_log_rotate_s, call_log_queue,
                        call_log_key_file) -> CallLogOptions | None:
    """CallLogOptions from the flags; None without --call-log. UsageError (exit 2) for flags that disagree."""
    if call_log_dir is None:
        if call_log_bodies or call_log_key_file:
            raise click.UsageError("--call-log-bodies and --call-log-key-file need --call-log")
        return None
    if call_log_rotate_bytes * 2 > call_log_max_bytes:
        raise click.UsageError("--call-log-rotate-bytes must be at most half of --call-log-max-bytes")
    return CallLogOptions(call_log_dir, call_log_bodies, call_log_retention_days, call_log_max_bytes,
                          call_log_rotate_bytes, call_log_rotate_s, call_log_queue, call_log_key_file)
