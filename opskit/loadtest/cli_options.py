"""The options every load-running command shares (`opskit loadtest`, `loadtest capacity`, `loadtest
replay`): one definition, so their names, defaults and help never drift apart."""

from __future__ import annotations

from pathlib import Path

import click


def _stack(*options):
    """One decorator applying `options` in the order listed (as they would be written one above another)."""
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


target_options = _stack(
    click.option("--target", "target_url",
                 help="API root of the target (else $OPSKIT_TARGET_URL, else the embedded mock)."),
    click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config with targets and auth."),
    click.option("--target-name", help="Which configured target (default: the first)."),
)

proxy_option = click.option("--proxy/--no-proxy", default=True, show_default=True,
                            help="Route through opskit's metering proxy.")

output_options = _stack(
    click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
                 show_default=True, help="Run directories go under here."),
    click.option("--slo", "slo_file", type=click.Path(dir_okay=False),
                 help="SLO override file (default loadtests/slo.yaml)."),
)
