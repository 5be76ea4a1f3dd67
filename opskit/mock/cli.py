"""`opskit mock`: flags -> settings -> run the API and admin listeners until SIGTERM/SIGINT.

Examples:
    opskit mock --listen 127.0.0.1:8000
    opskit mock --listen 127.0.0.1:0 --ready-file /tmp/mock.json --seed 1 --error-rate 500=0.05
    OPSKIT_MOCK_API_KEYS=sk-a,sk-b opskit mock --listen 127.0.0.1:8000 --auth bearer --rpm 60
"""

from __future__ import annotations

import math
import os

import click

from opskit.core.cli_helpers import is_loopback, parse_hostport
from opskit.mock.auth import ServerAuth, parse_pairs
from opskit.mock.settings import Faults, Latency, Limits, SettingsError, parse_error_rates
from opskit.mock.state import DEFAULT_MODELS, MockState

ENV_KEYS = "OPSKIT_MOCK_API_KEYS"


class FlagError(click.ClickException):
    """A bad flag: printed as one line (`Error: ...`), exit status 2, no usage block."""

    exit_code = 2


class OneLineCommand(click.Command):
    """Usage errors print as one line (`Error: ...`) with exit status 2, without the usage block."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse as click does, but turn usage errors into one-line FlagErrors."""
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise FlagError(exc.format_message().replace("\n", " ")) from None


def _fail(message: str) -> None:
    raise FlagError(message)


def _hostport(value: str, flag: str) -> tuple[str, int]:
    try:
        return parse_hostport(value, flag)
    except ValueError as exc:
        _fail(str(exc))


def _auth(scheme: str, api_keys: tuple[str, ...], clients: tuple[str, ...], ttl: float) -> ServerAuth:
    keys = [k for k in api_keys if k] + [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
    try:
        if scheme == "bearer":
            if not keys:
                _fail(f"--auth bearer needs at least one --api-key (or ${ENV_KEYS})")
            return ServerAuth("bearer", api_keys=frozenset(keys))
        if scheme == "hmac":
            pairs = parse_pairs(keys, "--api-key", "KEYID:SECRET")
            if not pairs:
                _fail(f"--auth hmac needs at least one --api-key KEYID:SECRET (or ${ENV_KEYS})")
            return ServerAuth("hmac", hmac_keys=pairs)
        if scheme == "oauth2":
            pairs = parse_pairs(list(clients), "--client")
            if not pairs:
                _fail("--auth oauth2 needs at least one --client ID:SECRET")
            return ServerAuth("oauth2", clients=pairs, token_ttl_s=ttl)
    except ValueError as exc:
        _fail(str(exc))
    return ServerAuth("none")


def _settings(o: dict) -> tuple[Latency, Faults, Limits]:
    latency, faults, limits = Latency(), Faults(), Limits()
    rates: dict[str, float] = {}
    items = [part.strip() for value in o["error_rate"] for part in value.split(",") if part.strip()]
    for item in items:   # repeated flags, or one flag with 500=0.05,503=0.01
        status, sep, rate = item.partition("=")
        try:
            rates[status] = float(rate)
        except ValueError:
            _fail(f"--error-rate: expected STATUS=RATE like 500=0.05, got {item!r}")
        if not sep:
            _fail(f"--error-rate: expected STATUS=RATE like 500=0.05, got {item!r}")
    try:
        parse_error_rates(rates)
        latency.update({k: o[k] for k in ("ttft_ms", "ttft_jitter_ms", "itl_ms", "itl_jitter_ms",
                                           "output_tokens_mean", "output_tokens_spread", "tokens_per_chunk",
                                           "capacity")})
        faults.update({"error_rate": rates, "hang_rate": o["hang_rate"], "cut_rate": o["cut_rate"],
                       "malformed_rate": o["malformed_rate"], "extra_ttft_ms": o["extra_ttft_ms"]})
        limits.update({"rpm": o["rpm"], "tpm": o["tpm"], "daily_quota": o["daily_quota"],
                       "window_s": o["rate_window_s"]})
    except SettingsError as exc:  # messages name the admin API's keys; say the flag instead
        key, _, rest = str(exc).partition(":")
        flag = "rate_window_s" if key == "window_s" else key
        _fail(f"--{flag.replace('_', '-')}:{rest.replace(' or null', '')}")
    return latency, faults, limits


@click.command(cls=OneLineCommand)
@click.option("--listen", required=True, help="API address HOST:PORT (:PORT = all interfaces, port 0 = a free port).")
@click.option("--admin-listen", default="127.0.0.1:0", show_default=True, help="Admin address; loopback only.")
@click.option("--ready-file", type=click.Path(dir_okay=False), help="Written (atomically) once listening: JSON url/admin_url/pid.")
@click.option("--seed", type=int, help="Seed for the latency model and fault dice (reproducible runs).")
@click.option("--ttft-ms", type=float, default=50.0, show_default=True, help="Mean time to first token.")
@click.option("--ttft-jitter-ms", type=float, default=10.0, show_default=True, help="Its standard deviation.")
@click.option("--itl-ms", type=float, default=10.0, show_default=True, help="Mean inter-token latency.")
@click.option("--itl-jitter-ms", type=float, default=2.0, show_default=True, help="Its standard deviation.")
@click.option("--output-tokens-mean", type=float, default=64.0, show_default=True,
              help="Mean output length (max_tokens and stop still apply).")
@click.option("--output-tokens-spread", type=float, default=16.0, show_default=True, help="Its standard deviation.")
@click.option("--tokens-per-chunk", type=int, default=1, show_default=True, help="Output tokens per SSE chunk.")
@click.option("--capacity", type=int, default=256, show_default=True, help="Concurrent generations; the rest queue.")
@click.option("--error-rate", multiple=True, metavar="STATUS=RATE", help="Injected errors, e.g. 500=0.05 (500/502/503).")
@click.option("--hang-rate", type=float, default=0.0, help="Fraction of requests never answered.")
@click.option("--cut-rate", type=float, default=0.0, help="Fraction of streams closed half-way without [DONE].")
@click.option("--malformed-rate", type=float, default=0.0, help="Fraction of streams with one chunk of invalid JSON.")
@click.option("--extra-ttft-ms", type=float, default=0.0, help="Added to every TTFT.")
@click.option("--rpm", type=int, help="Requests per window per API key (or client IP).")
@click.option("--tpm", type=int, help="Tokens (prompt + output) per window per API key (or client IP).")
@click.option("--rate-window-s", type=float, default=60.0, show_default=True, help="Rate-limit window length.")
@click.option("--daily-quota", type=int, help="Requests per UTC day per API key; then 403 quota_exhausted.")
@click.option("--auth", "auth_scheme", type=click.Choice(["none", "bearer", "oauth2", "hmac"]), default="none",
              show_default=True)
@click.option("--api-key", multiple=True, help=f"Bearer key, or KEYID:SECRET for hmac (also ${ENV_KEYS}, comma-separated).")
@click.option("--client", multiple=True, metavar="ID:SECRET", help="OAuth2 client credentials.")
@click.option("--token-ttl-s", type=float, default=3600.0, show_default=True, help="OAuth2 token lifetime.")
@click.option("--model", "models", multiple=True, help="Served model names (default: deepseek-chat, deepseek-reasoner).")
@click.option("--engine", type=click.Choice(["vllm", "sglang", "tgi"]),
              help="Play this model server: its /metrics (driven by a KV-cache model with preemption) and "
                   "endpoints.")
@click.option("--kv-capacity-tokens", type=int, default=1 << 20, show_default=True,
              help="With --engine: KV-cache size in tokens (prompt + generated tokens of running requests).")
def mock(**o) -> None:
    """Run the embedded OpenAI-compatible mock LLM server (fast and healthy by default).

    \b
    Examples:
      opskit mock --listen 127.0.0.1:8000
      opskit mock --listen 127.0.0.1:0 --ready-file /tmp/mock.json --seed 1 --error-rate 500=0.05
      OPSKIT_MOCK_API_KEYS=sk-a,sk-b opskit mock --listen 127.0.0.1:8000 --auth bearer --rpm 60
      opskit mock --listen 127.0.0.1:8000 --engine vllm --capacity 64 --kv-capacity-tokens 50000

    Keys given with --api-key are visible in the process list; prefer $OPSKIT_MOCK_API_KEYS.
    The admin API (faults, limits, latency, counters) listens on --admin-listen; see the README.
    """
    host, port = _hostport(o["listen"], "--listen")
    admin_host, admin_port = _hostport(o["admin_listen"], "--admin-listen")
    if not is_loopback(admin_host):
        _fail(f"--admin-listen: the admin API is loopback-only; got {admin_host!r}")
    if not (math.isfinite(o["token_ttl_s"]) and o["token_ttl_s"] > 0):  # nan passed `<= 0`, then every token call 500'd
        _fail(f"--token-ttl-s: expected a finite number > 0, got {o['token_ttl_s']}")
    latency, faults, limits = _settings(o)
    auth = _auth(o["auth_scheme"], o["api_key"], o["client"], o["token_ttl_s"])
    state = MockState(latency, faults, limits, auth, seed=o["seed"], models=tuple(o["models"]) or DEFAULT_MODELS)
    if o["kv_capacity_tokens"] < 1:
        _fail("--kv-capacity-tokens: expected an integer >= 1")
    if o["engine"]:
        state.enable_engine(o["engine"], o["kv_capacity_tokens"])
    from opskit.mock.run import ServeError, serve  # aiohttp/uvloop only when actually serving
    try:
        serve(state, (host, port), (admin_host, admin_port), o["ready_file"])
    except ServeError as exc:  # the machine's state, not the flags: exit 1, as `opskit exporter` does
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(1) from None
