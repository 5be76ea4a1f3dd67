"""The `opskit` command line.

Each subcommand lives next to the code it drives and is loaded only when it is run, so
`opskit --help` stays fast and a command's heavy imports (aiohttp, pandas, ...) stay out of the
others. Register a command by adding one line to COMMANDS: name -> "module:attribute".
"""

from __future__ import annotations

import importlib

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


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = COMMANDS.get(cmd_name)
        if spec is None:
            return None
        module_name, attr = spec.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context):
        """Run the command; a config error anywhere becomes one line on stderr and exit 2."""
        from opskit.config import ConfigError

        try:
            return super().invoke(ctx)
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
    """
