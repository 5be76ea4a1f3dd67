"""`opskit loadtest` and `opskit report compare`: thin printing over gate, report and compare."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from opskit.core.cli_helpers import FiniteRange, embedded_mock_args, sigterm_unwinds
from opskit.core.config import ENV_TARGET_URL, ConfigError
from opskit.loadtest.cli_options import output_options, proxy_option, target_options


def _progress_printer():
    """Overwrite one line on a terminal; elsewhere (make, CI logs) print a line every 5 s."""
    tty = sys.stderr.isatty()
    state = {"n": 0}

    def progress(line: str) -> None:
        """Show the live progress line."""
        state["n"] += 1
        if tty:
            click.echo("\r" + line.ljust(100)[:120], nl=False, err=True)
        elif state["n"] % 5 == 1:
            click.echo(line, err=True)

    def echo(line: str) -> None:
        """Print a whole line (clearing a progress line first)."""
        if tty and state["n"]:
            click.echo("\r" + " " * 120 + "\r", nl=False, err=True)
        click.echo(line, err=True)

    return progress, echo


class ScenariosOrCapacity(click.Command):
    """`opskit loadtest [SCENARIO...]` runs the release gate; `opskit loadtest capacity ...` and
    `opskit loadtest replay ...` hand the rest of the line to a command of their own, with its own flags."""

    SUBCOMMANDS = {"capacity": ("opskit.loadtest.capacity_cli", "capacity"),
                   "replay": ("opskit.loadtest.replay_cli", "replay")}

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] in self.SUBCOMMANDS:
            import importlib

            module, name = self.SUBCOMMANDS[args[0]]
            command = getattr(importlib.import_module(module), name)
            return command.make_context(f"{info_name} {args[0]}", args[1:], parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command(cls=ScenariosOrCapacity)
@click.argument("scenarios", nargs=-1)
@target_options
@click.option("--duration", type=FiniteRange(min=1), default=20.0, show_default=True, help="Seconds per scenario.")
@click.option("--rate", type=FiniteRange(min=0.01), help="qps: offered requests/s (default 20).")
@click.option("--arrival", type=click.Choice(["fixed", "poisson", "ramp"]), default="fixed", show_default=True,
              help="qps: arrival process.")
@click.option("--users", type=click.IntRange(min=1), help="Concurrent users (streaming 50, conversation 10, throttling 8).")
@click.option("--processes", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="Locust processes (>1: a master and this many workers).")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Streamed (SSE) or plain JSON responses.")
@click.option("--transport", type=click.Choice(["sse", "ws"]), default="sse", show_default=True,
              help="ws: the mock's WebSocket transport (sent direct, not through the proxy).")
@click.option("--model", help="Model name (default: the target's first model).")
@click.option("--input-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Prompt length, mean.")
@click.option("--input-spread", type=click.IntRange(min=0), default=16, show_default=True)
@click.option("--output-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="max_tokens, mean.")
@click.option("--output-spread", type=click.IntRange(min=0), default=16, show_default=True)
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help="JSONL file of prompts instead.")
@click.option("--mock-args", default="", help='Flags for the embedded mock, e.g. "--error-rate 500=0.05".')
@proxy_option
@click.option("--placement/--no-placement", default=True, show_default=True,
              help="With 2+ cores: the embedded mock and the proxy on one core, Locust on the others.")
@click.option("--limit-requests", type=FiniteRange(min=1), help="throttling: requests the target allows per window.")
@click.option("--limit-window-s", type=FiniteRange(min=0.1), help="throttling: the limit's window (default 60).")
@click.option("--overdrive", type=FiniteRange(min=1.0), default=2.0, show_default=True,
              help="throttling: offered load as a multiple of the limit.")
@click.option("--turns", type=click.IntRange(min=1), default=4, show_default=True, help="conversation: turns per chat.")
@click.option("--keep-turns", type=click.IntRange(min=0), default=3, show_default=True,
              help="conversation: earlier turns sent with each question (besides the system prompt).")
@click.option("--timeout", "timeout_s", type=FiniteRange(min=0.1), default=30.0, show_default=True,
              help="Per-request timeout, seconds.")
@click.option("--seed", type=int, default=1, show_default=True)
@output_options
@click.option("--scenario-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Your own Locust files (<scenario>.py, e.g. an edited copy of the shipped loadtests/).")
@click.option("--engine-metrics", metavar="URL|mock",
              help="Sample a model server's /metrics (vLLM, SGLang, TGI) during each scenario; `mock`: the "
                   "embedded mock, started as a vLLM engine. The report shows its queue, KV cache and own TTFT.")
@click.option("--baseline", type=click.Path(), help="A previous run directory: compare and fail on regression.")
@click.option("--tolerance", type=FiniteRange(min=0), default=0.10, show_default=True,
              help="Relative change counted as a regression against --baseline.")
@click.option("--prices", "prices_file", type=click.Path(dir_okay=False),
              help="YAML prices (a target's `prices:` section) for the run's cost; else the target's own.")
def loadtest(scenarios, target_url, config_file, target_name, duration, rate, arrival, users, processes, stream,
             transport, model, input_tokens, input_spread, output_tokens, output_spread, prompts_file, mock_args,
             proxy, limit_requests, limit_window_s, overdrive, turns, keep_turns, timeout_s, seed, out_dir, slo_file,
             scenario_dir, engine_metrics, baseline, tolerance, prices_file, placement) -> None:
    """Run load-test scenarios against a target and gate on SLOs.

    \b
    SCENARIOS: qps streaming throttling conversation (default: all four; against --target/--config,
    throttling only with --limit-requests, since it judges the target against that limit).
    `opskit loadtest capacity --help`: the search for the highest load that meets every SLO.
    `opskit loadtest replay --help`: replay recorded traffic (a call log, Mooncake or Azure trace).
    Exit status: 0 pass, 1 an SLO missed (or a regression against --baseline), 2 usage/config error.
    Examples:
      opskit loadtest                                   # all scenarios against the embedded mock
      opskit loadtest qps --rate 100 --arrival poisson --processes 2
      opskit loadtest streaming --mock-args "--extra-ttft-ms 1000"     # must fail: ttft_p95
      opskit loadtest --config opskit.yaml --target-name deepseek throttling --limit-requests 60
      opskit loadtest --prices loadtests/example-prices.yaml   # the mock priced: tokens and cost shown
    """
    from opskit.loadtest import compare, gate, report, runner
    from opskit.loadtest.prompts import PromptSpec, load_file

    if prompts_file:
        load_file(prompts_file)  # a bad file is a config error now, not in every Locust process
    extra = embedded_mock_args(mock_args, target_url, config_file)
    if engine_metrics == "mock":
        if target_url or config_file:
            raise click.UsageError("--engine-metrics mock needs the embedded mock (no --target/--config); "
                                   "give the engine's /metrics URL instead")
        extra = [*extra, "--engine", "vllm"]
    elif engine_metrics and not engine_metrics.startswith(("http://", "https://")):
        raise click.UsageError(f"--engine-metrics: expected an http(s) URL or `mock`, got {engine_metrics!r}")
    if target_name and not config_file:  # else ignored: the run would go to the mock or --target instead
        raise click.UsageError("--target-name picks one of the targets of --config; give --config")
    base = compare.load_summary(baseline) if baseline else None
    prompt = PromptSpec(input_tokens, input_spread, output_tokens, output_spread, prompts_file).__dict__
    if not scenarios:
        scenarios = runner.DEFAULT_SCENARIOS
        if (target_url or config_file or os.environ.get(ENV_TARGET_URL)) and not limit_requests:
            # a real target's limit is unknown: the throttling checks could only fail; ask for it explicitly
            scenarios = tuple(s for s in scenarios if s != "throttling")
            click.echo("note: throttling skipped: give --limit-requests (the target's limit) to run it", err=True)
    if base is not None and not set(base["scenarios"]) & set(scenarios):  # else a gate that compares nothing
        raise click.UsageError(f"--baseline {baseline} has none of the scenarios to run "
                               f"(it has: {', '.join(sorted(base['scenarios'])) or 'none'})")
    opts = runner.Options(scenarios=tuple(scenarios), target_url=target_url,
                          config=config_file, target_name=target_name, duration=duration, rate=rate,
                          arrival=arrival, users=users, processes=processes, stream=stream, transport=transport,
                          model=model, prompt=prompt, mock_args=extra, proxy=proxy, limit_requests=limit_requests,
                          window_s=limit_window_s, overdrive=overdrive, turns=turns, keep_turns=keep_turns,
                          timeout_s=timeout_s, seed=seed, out_dir=out_dir,
                          engine_metrics=engine_metrics, prices=load_prices(prices_file) if prices_file else None,
                          placement=placement,
                          **({"locustfiles": scenario_dir} if scenario_dir else {}))
    if problem := runner.capacity_problem(opts):  # refused before anything starts: it could not end on time
        raise click.UsageError(problem)
    progress, echo = _progress_printer()
    # SIGTERM (a CI job's timeout, kill) must unwind like Ctrl-C does, or the mock, the exporter and
    # Locust, each in its own session, would outlive the run
    say = lambda: click.echo("opskit loadtest: terminated; stopping the mock, the exporter and Locust",  # noqa: E731
                             err=True)
    try:
        with sigterm_unwinds(say):
            verdict, run_dir = gate.run(opts, echo, progress, slo_file)
    except (runner.RunError, runner.processes.SuperviseError) as exc:
        echo(f"opskit loadtest: {exc}")
        sys.exit(2)
    click.echo(report.render(verdict))
    click.echo(f"report: {run_dir / 'report.html'}")
    sys.exit(max(0 if verdict.passed else 1, _against_baseline(base, run_dir, tolerance, baseline)))



def load_prices(path: str):
    """Prices from a YAML file holding a target's `prices:` mapping; ConfigError (one line) when bad."""
    import yaml

    from opskit.core import pricing

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(path, "", f"a readable YAML mapping of prices ({exc.__class__.__name__})") from None
    if isinstance(data, dict) and set(data) == {"prices"}:  # a section copied with its key
        data = data["prices"]
    try:
        return pricing.parse(data, "prices")
    except pricing.PricingError as exc:
        raise ConfigError(path, exc.key, exc.expected) from None


def _against_baseline(base: dict | None, run_dir: Path, tolerance: float, base_path: str | None) -> int:
    """Print the comparison with --baseline, and add it to the report; 1 on a regression."""
    from opskit.loadtest import compare

    if base is None:
        return 0
    from opskit.loadtest import report

    new = compare.load_summary(run_dir)
    table = compare.compare(base, new, tolerance)
    missing = compare.only_in_one(base, new)
    click.echo(compare.render(table, missing))
    if not table.empty:  # the comparison in the report too, to forward with it
        report.add_section(run_dir / "report.html", compare.html_section(table, missing, tolerance, base_path))
    return 1 if table["regressed"].any() else 0


@click.group()
def report() -> None:
    """Work with load-test run directories (reports/<run>/).

    \b
    Examples:
      opskit report show reports/20261122-003616
      opskit report compare reports/20261122-003616 reports/20261123-101500 --tolerance 0.1
      opskit report evaluate /runs/release          # a distributed run's logs -> verdict and report
    """


@report.command("compare")
@click.argument("base", type=click.Path(exists=True))
@click.argument("new", type=click.Path(exists=True))
@click.option("--tolerance", type=FiniteRange(min=0), default=0.10, show_default=True,
              help="Relative worsening of a latency or throughput counted as a regression.")
@click.option("--error-tolerance", type=FiniteRange(min=0), default=0.005, show_default=True,
              help="Absolute rise of the error ratio counted as a regression.")
def compare_cmd(base, new, tolerance, error_tolerance) -> None:
    """Compare two runs: a table of metric changes; exit 1 on a regression.

    BASE and NEW are run directories (or their summary.json).
    """
    from opskit.loadtest import compare

    b, n = compare.load_summary(base), compare.load_summary(new)
    if not set(b["scenarios"]) & set(n["scenarios"]):  # comparing nothing must not read as "no regression"
        raise click.UsageError(f"BASE and NEW have no scenario in common (BASE: {', '.join(sorted(b['scenarios']))}"
                               f"; NEW: {', '.join(sorted(n['scenarios']))})")
    table = compare.compare(b, n, tolerance, error_tolerance)
    click.echo(compare.render(table, compare.only_in_one(b, n)))
    sys.exit(1 if table["regressed"].any() else 0)


@report.command("show")
@click.argument("run", type=click.Path(exists=True))
def show_cmd(run) -> None:
    """Print a finished run's verdict table again (from its summary.json); exit 0 pass, 1 fail."""
    from opskit.loadtest import compare
    from opskit.loadtest.report import render
    from opskit.loadtest.slo import Check, Verdict

    data = compare.load_summary(run)
    if data.get("kind") == "capacity":
        from opskit.loadtest.capacity_report import render as render_capacity

        click.echo(render_capacity(data))
        sys.exit(0 if data.get("max_load") else 1)
    try:
        verdict = Verdict(checks=[Check(**c) for c in data.get("checks", [])], summaries=data["scenarios"])
    except TypeError:
        raise ConfigError(str(run), "checks", "checks written by opskit loadtest") from None
    click.echo(render(verdict))
    sys.exit(0 if verdict.passed else 1)


@report.command("evaluate")
@click.argument("run", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--params", "params_file", type=click.Path(dir_okay=False, exists=True),
              help="The run's params JSON (default: $OPSKIT_LT_PARAMS, as the workers got it).")
@click.option("--slo", "slo_file", type=click.Path(dir_okay=False), help="SLO override file (default loadtests/slo.yaml).")
def evaluate_cmd(run: Path | None, params_file: str | None, slo_file: str | None) -> None:
    """Judge a run from the per-request logs its Locust processes wrote (RUN/log/requests-*.jsonl), as
    `opskit loadtest` judges its own: verdict, summary.json and report.html; exit 0 pass, 1 fail.

    RUN defaults to the params' run_dir (the release Job's master runs it after Locust ends).
    """
    from opskit.loadtest import evaluate

    params = evaluate.read_params(params_file)
    run = run or (Path(params.run_dir) if params is not None else None)
    if run is None:
        raise click.UsageError("give RUN, or the run's params (--params FILE or $OPSKIT_LT_PARAMS)")
    verdict, _ = evaluate.evaluate(run, params, slo_file)
    click.echo(evaluate.main_text(verdict, run))
    sys.exit(0 if verdict.passed else 1)
