"""`opskit stack up|down|status`: the click commands over opskit.live.stack (which does the work)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from opskit.core.cli_helpers import sigterm_unwinds
from opskit.live import stack_settings
from opskit.live.stack import (
    DEFAULT_STATE_DIR,
    GPU_MODES,
    AlreadyUp,
    Stack,
    StackError,
    StackSpec,
    down,
    status_lines,
    up,
)
from opskit.live.stack_config import Timing


@click.group()
def stack() -> None:
    """Run the local monitoring stack: mock, exporter, Prometheus, Alertmanager, receiver.

    \b
    Examples:
      opskit stack up                                  # against the embedded mock, state in .stack/
      opskit stack up --target https://api.deepseek.com --gpu off    # key from $OPSKIT_API_KEY
      opskit stack status                              # exit 1 when any component is down
      opskit stack down
    """



def _duration(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:  # checked as a flag, so the error names --scrape-interval rather than the config field
        Timing(value).check()
    except ValueError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[1]) from None
    return value


def _state_dir(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    # a regular file here made every subcommand end in a NotADirectoryError traceback: a usage error
    if value.exists() and not value.is_dir():
        raise click.BadParameter(f"{str(value)!r} exists and is not a directory")
    return value


_state_opt = click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, type=click.Path(path_type=Path),
                          callback=_state_dir, help="Where configs, data, logs and the pid/state file live "
                          "(status, down: default the last `stack up`'s when none is in .stack).")


@stack.command("up")
@_state_opt
@click.option("--config", "config", type=click.Path(dir_okay=False),
              help="YAML config naming a real target (instead of the mock).")
@click.option("--target", help="A real target's API root (instead of the mock); key from $OPSKIT_API_KEY.")
@click.option("--gpu", type=click.Choice(GPU_MODES), default="auto", show_default=True,
              help="auto: GPU series when NVML is present; fake: the tests' fake libnvidia-ml; off.")
@click.option("--scrape-interval", default="5s", show_default=True, callback=_duration,
              help="Prometheus scrape and rule interval.")
def up_cmd(state_dir: Path, config: str | None, target: str | None, gpu: str, scrape_interval: str) -> None:
    """Start the stack in the background and print where each part listens (exit 0 if already up, 1 if
    partly down)."""
    timing = Timing(scrape_interval, scrape_interval)
    spec = StackSpec(state_dir=state_dir, config=config, target=target, gpu=gpu, timing=timing)
    try:
        with sigterm_unwinds():  # unwind, so up() stops what it has started so far
            started = up(spec)
    except AlreadyUp as exc:
        started = exc.stack
        lines, all_up = status_lines(started)
        if not all_up:  # "already up" with exit 0 would hide a dead component from whoever runs up to repair
            click.echo("\n".join(lines))
            raise click.ClickException(f"stack partly down (state dir {state_dir}): `opskit stack down`, "
                                       f"then `opskit stack up`, restarts it") from None
        click.echo(str(exc))
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    lines, _ = status_lines(started)
    click.echo("\n".join(lines))
    click.echo(f"notifications: {started.files.get('notifications', '-')}")
    click.echo("\n".join(stack_settings.settings_lines({c.child.name: c.urls for c in started.components})))
    stack_settings.remember(state_dir)


def _resolve(ctx: click.Context, state_dir: Path) -> Path:
    """The state dir to use: the flag's; without the flag and no stack in the default dir, the one the
    last `stack up --state-dir X` used (saying so), so `status` and `down` never call a running stack down."""
    if ctx.get_parameter_source("state_dir") != click.core.ParameterSource.DEFAULT or (state_dir / "state.json").exists():
        return state_dir
    last = stack_settings.last()
    if last is None or last == state_dir.resolve():
        return state_dir
    click.echo(f"using the stack of the last `opskit stack up` (--state-dir {last})", err=True)
    return last


@stack.command("down")
@_state_opt
@click.pass_context
def down_cmd(ctx: click.Context, state_dir: Path) -> None:
    """Stop every process the stack started."""
    state_dir = _resolve(ctx, state_dir)
    try:
        stopped = down(state_dir)
        stack_settings.forget(state_dir)
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else f"nothing running (state dir {state_dir})")


@stack.command("status")
@_state_opt
@click.pass_context
def status_cmd(ctx: click.Context, state_dir: Path) -> None:
    """Show each component, its pid and URLs; exit 1 when the stack is down or partly down."""
    state_dir = _resolve(ctx, state_dir)
    try:
        recorded = Stack.load(state_dir)
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    if recorded is None:
        click.echo(f"stack is down (no state in {state_dir})")
        sys.exit(1)
    lines, all_up = status_lines(recorded)
    click.echo("\n".join(lines))
    if not all_up:
        sys.exit(1)
