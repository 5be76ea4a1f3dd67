"""The `opskit` command line.

Each subcommand lives next to the code it drives and is loaded only when it is run, so
`opskit --help` stays fast and a command's heavy imports (aiohttp, pandas, ...) stay out of the
others. Register a command by adding one line to COMMANDS: name -> "module:attribute".
"""

from __future__ import annotations

import importlib

import click

from opskit import __version__
from opskit.core.cli_helpers import CONTEXT, one_line

COMMANDS: dict[str, str] = {
    # name:        "module:click command"
    "mock": "opskit.mock.cli:mock",
    "loadtest": "opskit.loadtest.cli:loadtest",
    "report": "opskit.loadtest.cli:report",
    "stack": "opskit.live.stack_cli:stack",
    "generate": "opskit.opscode.generate:generate",
    "drill": "opskit.live.drill:drill",
    "exporter": "opskit.sidecar.exporter:exporter_command",
    "calllog": "opskit.sidecar.call_log_stats:calllog",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use; usage errors print as one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse as click does (`opskit --bad-flag` is a one-line usage error)."""
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise one_line(exc) from None

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
        from opskit.core.config import ConfigError

        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # from any subcommand or sub-group, however deep
            raise one_line(exc) from None
        except ConfigError as exc:
            click.echo(f"opskit: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("opskit: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, context_settings=CONTEXT)
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
      opskit generate alerts --check
      opskit calllog stats /var/log/opskit-calls

    Each command's --help has more examples. Usage and config errors exit 2.
    """
