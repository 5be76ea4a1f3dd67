"""What every command shares on the command line: finite float ranges, one-line usage errors,
host:port parsing, URLs fit for printing, and SIGTERM that unwinds like Ctrl-C.

Commands import this module, never `opskit.cli` (the group imports the commands, not the reverse).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import signal
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import click

CONTEXT = {"help_option_names": ["-h", "--help"]}


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: click lets both through (nan compares false with
    every bound), and `--rate nan` hung a load test while `--duration inf` crashed it."""

    def convert(self, value, param, ctx):
        """The float, or a usage error when it is out of range or not finite."""
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def one_line(exc: click.UsageError) -> click.UsageError:
    """The same usage error without click's usage block and hint: one line, `Error: ...`, exit 2."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError) or exc.ctx is None:
        return exc  # a bare `opskit report` still prints its help
    one = click.UsageError(exc.format_message().replace("\n", " "))
    one.exit_code = exc.exit_code
    return one


def parse_hostport(value: str, flag: str = "--listen") -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all interfaces) -> (host, port); ValueError if malformed.
    Port 0 means a free port, chosen when listening."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{flag}: expected HOST:PORT with a port 0-65535 (0 = a free one), got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (`localhost`, 127.0.0.0/8, ::1).
    A name that merely starts with "127." (127.x.example) is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """A URL fit for logs, reports and errors: no user:password@, no query string (either may carry a
    key); a URL that cannot even be split is shown as its scheme and a placeholder."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.partition("://")[0] + "://<malformed>" if "://" in url else "<malformed URL>"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


@contextlib.contextmanager
def sigterm_unwinds(say: Callable[[], None] | None = None) -> Iterator[None]:
    """Within the block, SIGTERM (a CI timeout, kill) raises SystemExit(143) so `finally` clauses stop
    what the command started, as Ctrl-C does; `say` prints a line first. The default is restored after."""

    def handler(signum, frame):
        if say:
            say()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def embedded_mock_args(mock_args: str, target_url: str | None, config_file: str | None) -> list[str]:
    """`--mock-args` split as a shell would; a usage error when unparsable or when a target is given
    (they apply only to the embedded mock)."""
    import shlex

    try:
        extra = shlex.split(mock_args)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--mock-args") from None
    if extra and (target_url or config_file):
        raise click.UsageError("--mock-args applies only to the embedded mock (no --target/--config)")
    return extra
