"""`opskit generate alerts|dashboards|manifests`: write the generated operations files, or check them.

    opskit generate alerts                       # rewrite alerts/opskit.rules.yml, alertmanager.yml
    opskit generate dashboards --check           # exit 1 if dashboards/generated/ is out of date
    opskit generate manifests --runbook-base URL --out-dir /tmp/k8s # deploy/generated/*.yaml somewhere else

Each generator only returns `{relative path: text}`; `write_or_check` is the one place that compares
with, or writes to, the output folder. By default that folder is the shipped one (the checkout's own
folder in a source install), so `--check` tells whether the committed files match the code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from opskit.core.cli_helpers import CONTEXT
from opskit.core.config import ConfigError
from opskit.opscode import alert_rules, routing
from opskit.shipped import folder

OUT_DIR = click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
                       help="Where to write or check (default: the shipped folder).")
CHECK = click.option("--check", is_flag=True, help="Write nothing; exit 1 if a file in --out-dir differs.")
THRESHOLDS = click.option("--thresholds", "thresholds_file", type=click.Path(dir_okay=False),
                          help="Threshold overrides (YAML); default $OPSKIT_THRESHOLDS, else the built-in values.")


def stale(files: dict[str, str], out_dir: Path) -> list[str]:
    """The names in `files` whose copy under `out_dir` is missing or differs."""
    return [n for n, text in files.items() if not (out_dir / n).is_file() or (out_dir / n).read_text() != text]


def write_or_check(what: str, render: Callable[[], dict[str, str]], out_dir: Path, check: bool) -> None:
    """Render the files; with `check`, exit 1 naming the stale ones; else write them under `out_dir`.
    A generator's ValueError (a bad flag value) is a usage error; ConfigError reaches the CLI's one line."""
    try:
        files = render()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(str(getattr(exc, "filename", "") or what), "", f"readable ({exc.strerror})") from None
    if check:
        old = stale(files, out_dir)
        if old:
            click.echo(f"out of date under {out_dir}: {', '.join(old)} (run: opskit generate {what})", err=True)
            raise SystemExit(1)
        click.echo(f"{len(files)} {what} files up to date under {out_dir}")
        return
    for name, text in files.items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(text)
    click.echo(f"wrote {len(files)} files under {out_dir}: {', '.join(files)}")


@click.group(context_settings=CONTEXT)
def generate() -> None:
    """Generate the alert rules, dashboards and Kubernetes manifests from the thresholds.

    \b
    Examples:
      opskit generate alerts --check
      opskit generate dashboards --out-dir /tmp/grafana --prometheus-url http://prometheus:9090
      opskit generate manifests --runbook-base https://git.example.com/ops/opskit/blob/main/alerts/runbook.md
    """


@generate.command(context_settings=CONTEXT)
@THRESHOLDS
@OUT_DIR
@click.option("--short-for", help="Replace every alert's `for:` with this duration (live drills).")
@click.option("--eval-interval", help="Rule groups' evaluation interval (default: Prometheus' global).")
@click.option("--exporter-job", default=alert_rules.DEFAULT_EXPORTER_JOB, show_default=True,
              help="Regex the opskit exporter's scrape `job` label matches.")
@click.option("--runbook-base", envvar="OPSKIT_RUNBOOK_BASE", default="alerts/runbook.md", show_default=True,
              help="URL of runbook.md (absolute: links that work in a notification); $OPSKIT_RUNBOOK_BASE.")
@click.option("--gpu-source", type=click.Choice(["nvml", "dcgm", "both"]), default="nvml", show_default=True,
              help="Where GPU series come from: opskit's NVML collector, NVIDIA's dcgm-exporter (mapped onto "
                   "opskit's names by recording rules), or both (one source per node).")
@click.option("--dcgm-job", default=".*dcgm.*", show_default=True,
              help="Regex the dcgm-exporter's scrape `job` label matches (its `up` is opskit_gpu_up).")
@click.option("--receiver-url", envvar="OPSKIT_ALERT_RECEIVER_URL",
              help="Send every receiver to this one webhook URL (drills); $OPSKIT_ALERT_RECEIVER_URL.")
@click.option("--pager-url", envvar="OPSKIT_ALERT_PAGER_URL", default=routing.DEFAULT_URLS["pager"],
              show_default=True, help="Webhook of the critical (paging) receiver; $OPSKIT_ALERT_PAGER_URL.")
@click.option("--chat-url", envvar="OPSKIT_ALERT_CHAT_URL", default=routing.DEFAULT_URLS["chat"],
              show_default=True, help="Webhook of the warning (chat) receiver; $OPSKIT_ALERT_CHAT_URL.")
@click.option("--ticket-url", envvar="OPSKIT_ALERT_TICKET_URL", default=routing.DEFAULT_URLS["ticket"],
              show_default=True, help="Webhook of the ticket receiver; $OPSKIT_ALERT_TICKET_URL.")
@CHECK
def alerts(thresholds_file, out_dir: Path | None, check: bool, receiver_url, pager_url, chat_url, ticket_url,
           **kw) -> None:
    """Prometheus rules and Alertmanager config (alerts/)."""
    from opskit.core import thresholds
    from opskit.opscode import rules_file

    t = thresholds.load(thresholds_file)
    urls = {"pager": pager_url, "chat": chat_url, "ticket": ticket_url}
    if receiver_url:
        urls = dict.fromkeys(urls, receiver_url)
    write_or_check("alerts", lambda: rules_file.outputs(t, urls=urls, **kw), out_dir or folder("alerts"), check)


@generate.command(context_settings=CONTEXT)
@THRESHOLDS
@OUT_DIR
@click.option("--dashboards-path", default="/var/lib/grafana/dashboards/opskit", show_default=True,
              help="Where Grafana will find the JSON files (the provider's path).")
@click.option("--prometheus-url", default="http://127.0.0.1:9090", show_default=True,
              help="URL of the provisioned Prometheus datasource.")
@CHECK
def dashboards(thresholds_file, out_dir: Path | None, dashboards_path: str, prometheus_url: str,
               check: bool) -> None:
    """Grafana dashboard JSON and provisioning files (dashboards/generated/)."""
    from opskit.core import thresholds
    from opskit.opscode import dashboards as boards

    t = thresholds.load(thresholds_file)
    write_or_check("dashboards", lambda: boards.outputs(t, dashboards_path=dashboards_path,
                                                        prometheus_url=prometheus_url),
                   out_dir or folder("dashboards") / "generated", check)


@generate.command(context_settings=CONTEXT)
@OUT_DIR
@click.option("--alerts-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the rules files are (default: the shipped alerts/).")
@click.option("--dashboards-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the dashboard JSON is (default: the shipped dashboards/).")
@click.option("--runbook-base", envvar="OPSKIT_RUNBOOK_BASE",
              help="Required: absolute URL where alerts/runbook.md is published ($OPSKIT_RUNBOOK_BASE); "
                   "the PrometheusRule's runbook links point there.")
@CHECK
def manifests(out_dir: Path | None, alerts_dir: Path | None, dashboards_dir: Path | None, runbook_base: str | None,
              check: bool) -> None:
    """PrometheusRule and dashboard ConfigMaps made from alerts/ and dashboards/ (deploy/generated/).

    \b
    Example (the committed deploy/generated/ uses a placeholder base):
      opskit generate manifests --runbook-base https://git.example.com/ops/opskit/blob/main/alerts/runbook.md
    """
    import yaml

    from opskit.opscode import manifests as k8s

    if problem := k8s.absolute_runbook_base(runbook_base):
        raise click.UsageError(f"--runbook-base: {problem}")

    def render() -> dict[str, str]:
        try:
            return k8s.outputs(alerts_dir or folder("alerts"), dashboards_dir or folder("dashboards"), runbook_base)
        except yaml.YAMLError as exc:
            raise ConfigError("rules file", "", f"valid YAML ({str(exc).splitlines()[0]})") from None

    write_or_check("manifests", render, out_dir or folder("deploy") / "generated", check)
