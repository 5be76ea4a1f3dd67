"""The `opskit` command line.

Each subcommand lives next to the code it drives and is loaded only when it is run, so
`opskit --help` stays fast and a command's heavy imports (aiohttp, pandas, ...) stay out of the
others. Register a command by adding one line to COMMANDS: name -> "module:attribute".
"""

from __future__ import annotations

import importlib
import math

import click

from opskit import __version__

COMMANDS: dict[str, str] = {
    # name:        "module:click command"
    "mock": "opskit.mock.cli:mock",
    "loadtest": "opskit.loadtest.cli:loadtest",
    "report": "opskit.loadtest.cli:report",
    "stack": "opskit.stack:stack",
    "drill": "opskit.drill:drill",
    "exporter": "opskit.exporter:exporter_command",
}


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: click lets both through (nan compares false with
    every bound), and `--rate nan` hung a load test while `--duration inf` crashed it."""

    def convert(self, value, param, ctx):
        """The float, or a usage error when it is out of range or not finite."""
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def _one_line(exc: click.UsageError) -> click.UsageError:
    """The same usage error without click's usage block and hint: one line, `Error: ...`, exit 2."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError) or exc.ctx is None:
        return exc  # a bare `opskit report` still prints its help
    one = click.UsageError(exc.format_message().replace("\n", " "))
    one.exit_code = exc.exit_code
    return one


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use; usage errors print as one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse as click does (`opskit --bad-flag` is a one-line usage error)."""
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = COMMANDS.get(cmd_name)
        if spec is None:
            return None
        module_name, attr = spec.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context):
        """Run the command; a usage or config error anywhere becomes one line on stderr and exit 2."""
        from opskit.config import ConfigError

        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # from any subcommand or sub-group, however deep
            raise _one_line(exc) from None
        except ConfigError as exc:
            click.echo(f"opskit: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("opskit: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="opskit")
def main() -> None:
    """opskit: monitor and load-test an OpenAI-compatible LLM API.

    \b
    Examples:
      opskit mock --listen 127.0.0.1:8000
      opskit exporter --listen 127.0.0.1:9464 --probe --config opskit.yaml
      opskit loadtest qps streaming
      opskit report compare reports/<base run> reports/<new run>
      opskit stack up; opskit stack status; opskit stack down
      opskit drill

    Each command's --help has more examples. Usage and config errors exit 2.
    """
