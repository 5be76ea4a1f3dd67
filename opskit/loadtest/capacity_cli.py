"""`opskit loadtest capacity`: search for the highest load that meets every SLO, and gate on headroom."""

from __future__ import annotations

import sys

import click

from opskit.core.cli_helpers import CONTEXT, FiniteRange, embedded_mock_args, sigterm_unwinds
from opskit.loadtest.cli_options import output_options, proxy_option, target_options


@click.command(context_settings=CONTEXT)
@click.option("--by", type=click.Choice(["rate", "users"]), default="rate", show_default=True,
              help="rate: open-loop qps levels (req/s); users: closed-loop streaming levels (concurrent users).")
@target_options
@click.option("--model", help="Model name (default: the target's first model).")
@click.option("--mock-args", default="", help='Flags for the embedded mock, e.g. "--capacity 8 --itl-ms 20".')
@click.option("--start", type=FiniteRange(min=0.1), default=8.0, show_default=True, help="First level's load.")
@click.option("--factor", type=FiniteRange(min=1.1, max=10), default=2.0, show_default=True,
              help="Each ramp level is this many times the last.")
@click.option("--resolution", type=FiniteRange(min=0.01, max=1), default=0.1, show_default=True,
              help="Stop bisecting when the last good and first bad levels are this close (relative).")
@click.option("--max-load", type=FiniteRange(min=0.1), default=2000.0, show_default=True, help="Never offer more.")
@click.option("--level-duration", type=FiniteRange(min=3), default=10.0, show_default=True,
              help="Seconds a level runs at least (longer when it needs more time for 200 requests).")
@click.option("--max-duration", type=FiniteRange(min=30, max=3600), default=600.0, show_default=True,
              help="The whole search's time budget, seconds.")
@click.option("--processes", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="Locust processes per level (>1: a master and this many workers).")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Streamed (SSE) or plain JSON responses.")
@proxy_option
@click.option("--timeout", "timeout_s", type=FiniteRange(min=0.1), default=30.0, show_default=True,
              help="Per-request timeout, seconds.")
@click.option("--seed", type=int, default=1, show_default=True)
@output_options
@click.option("--planned-rate", type=FiniteRange(min=0, min_open=True),
              help="The load production will offer; with --min-headroom, exit 1 when capacity is short of it.")
@click.option("--min-headroom", type=FiniteRange(min=1), default=1.5, show_default=True,
              help="Required max load at SLO, as a multiple of --planned-rate.")
def capacity(by, target_url, config_file, target_name, model, mock_args, start, factor, resolution, max_load,
             level_duration, max_duration, processes, stream, proxy, timeout_s, seed, out_dir, slo_file,
             planned_rate, min_headroom) -> None:
    """Find the highest load at which every SLO holds: a geometric ramp until a level misses an SLO or the
    target saturates, then bisection; each level long enough for 200 requests.

    \b
    Exit status: 0 capacity found (and, with --planned-rate, headroom enough), 1 no level met the SLOs
    or the headroom is short, 2 usage/config error. Writes reports/<run>/summary.json and report.html.
    Examples:
      opskit loadtest capacity                                   # the embedded mock, by rate
      opskit loadtest capacity --mock-args "--capacity 8" --planned-rate 20 --min-headroom 1.5
      opskit loadtest capacity --by users --config opskit.yaml --max-duration 300
    """
    from opskit.loadtest import capacity as cap
    from opskit.loadtest import capacity_report, capacity_run, runner

    extra = embedded_mock_args(mock_args, target_url, config_file)
    def echo(line: str) -> None:
        click.echo(line, err=True)

    scenario = capacity_run.SCENARIO_BY[by]
    opts = runner.Options(scenarios=(scenario,), target_url=target_url, config=config_file, target_name=target_name,
                          duration=level_duration, processes=processes, stream=stream, model=model,
                          mock_args=extra, proxy=proxy, timeout_s=timeout_s, seed=seed, out_dir=out_dir)
    # never past what the load generator itself can offer: there the search would measure Locust
    per_process = runner.MAX_RATE_PER_PROCESS if by == "rate" else runner.MAX_USERS_PER_PROCESS
    if max_load > per_process * processes:
        echo(f"note: --max-load {max_load:g} lowered to {per_process * processes:,} ({per_process:,} a Locust "
             f"process; more with --processes)")
        max_load = per_process * processes
    plan = cap.SearchPlan(start=start, factor=factor, resolution=resolution, max_load=max_load,
                          budget_s=max_duration)
    lines: list[str] = []
    try:
        with sigterm_unwinds(lambda: echo("opskit loadtest capacity: terminated; stopping the helpers")):
            summary, run_dir = capacity_run.run(opts, by, plan, slo_file, echo, lines.append)
    except (runner.RunError, runner.processes.SuperviseError) as exc:
        echo(f"opskit loadtest capacity: {exc}")
        sys.exit(2)
    click.echo(capacity_report.render(summary))
    status = 0 if summary["max_load"] else 1
    if planned_rate:
        ok, line = cap.headroom_check(summary, planned_rate, min_headroom)
        click.echo(line)
        status = max(status, 0 if ok else 1)
    click.echo(f"report: {run_dir / 'report.html'}")
    sys.exit(status)
