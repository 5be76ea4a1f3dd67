"""`opskit loadtest replay --trace FILE`: replay recorded traffic against a target, and gate on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from opskit.core.cli_helpers import CONTEXT, FiniteRange, embedded_mock_args, sigterm_unwinds
from opskit.loadtest.cli_options import output_options, proxy_option, target_options

DEFAULT_MAX_DURATION = 600.0
# read this far past the last arrival that --window/--max-duration could replay: a call log's lines are
# written as calls end (a little out of order), and --max-duration counts from the window's first request
READ_SLACK_S = 600.0


def _model_mapper(force: str | None, served: tuple[str, ...] | None, fallback: str):
    """recorded model -> the model sent: --model for all; else as recorded when the target serves it (or
    its models are unknown), else the target's first model."""
    def model_for(recorded: str | None) -> str:
        if force:
            return force
        if not recorded:
            return fallback
        return recorded if served is None or recorded in served else fallback
    return model_for


@click.command(context_settings=CONTEXT)
@click.option("--trace", "trace_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="opskit call log (a calls-*.jsonl[.gz] file or its directory), Mooncake JSONL or Azure CSV.")
@click.option("--format", "fmt", type=click.Choice(["opskit", "mooncake", "azure"]), help="Default: detected.")
@click.option("--speed", type=FiniteRange(min=0.001), default=1.0, show_default=True,
              help="Time compression: 2 replays the arrivals twice as fast.")
@click.option("--window", metavar="START..END", help="Only the requests this many seconds from the trace's first "
              "(either side may be left out: 3600.. ), replayed from the first of them.")
@click.option("--max-requests", type=click.IntRange(min=1), help="Replay at most this many requests (the first).")
@click.option("--max-duration", type=FiniteRange(min=1), default=DEFAULT_MAX_DURATION, show_default=True,
              help="Replay at most this many seconds of arrivals (after --speed); the report says what was cut.")
@target_options
@click.option("--model", help="Send every request as this model (default: as recorded, see --help).")
@click.option("--stream/--no-stream", default=None, help="Override the recorded stream flag (Mooncake and Azure "
              "record none: streamed unless --no-stream).")
@click.option("--ignore-eos", is_flag=True, help="Ask the server for exactly the recorded output length "
              "(vLLM/SGLang's ignore_eos; other APIs may refuse the field).")
@click.option("--mock-args", default="", help='Flags for the embedded mock, e.g. "--itl-ms 20".')
@proxy_option
@click.option("--processes", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="Locust processes, each sending every N-th request of the trace.")
@click.option("--timeout", "timeout_s", type=FiniteRange(min=0.1), default=60.0, show_default=True,
              help="Per-request timeout, seconds.")
@click.option("--max-slowdown", type=FiniteRange(min=0),
              help="Fail when a model's replayed p95 duration exceeds the recorded one by more than this "
                   "fraction (0.1: 10 %%); opskit call logs only.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the synthetic prompt text.")
@output_options
def replay(trace_path, fmt, speed, window, max_requests, max_duration, target_url, config_file, target_name, model,
           stream, ignore_eos, mock_args, proxy, processes, timeout_s, max_slowdown, seed, out_dir, slo_file) -> None:
    """Replay a recorded trace against a target: each request at its recorded offset (open loop), with the
    recorded model, stream flag, input length (synthetic text; shared prefixes reproduced) and
    max_tokens = the recorded output length. Judged like any scenario (scenario `replay` in the SLO
    file), and the report compares replayed with recorded latency per model when the trace has it.

    \b
    Models: --model sends everything as one model. Otherwise the embedded mock serves the trace's
    models as recorded; a --config target gets a recorded model it lists, and its first model for any
    other; a bare --target URL gets the recorded names. Mooncake and Azure record no model: the
    target's first (the mock: deepseek-chat).
    A malformed trace line is skipped and counted (with its line number) in the report.
    Exit status: 0 pass, 1 an SLO missed, 2 usage/config error or no usable trace line.
    Examples:
      opskit loadtest replay --trace /var/log/opskit/calls/                # a call log directory
      opskit loadtest replay --trace mooncake_trace.jsonl --speed 4 --max-requests 2000
      opskit loadtest replay --trace AzureLLMInferenceTrace_conv.csv --window 600..900 --config opskit.yaml
    """
    from opskit.core import config
    from opskit.loadtest import gate, replay_compare, replay_plan, report, runner, trace
    from opskit.loadtest.cli import _progress_printer

    def fail(line: str) -> None:
        click.echo(f"opskit loadtest replay: {line}", err=True)
        sys.exit(2)

    try:
        lo, hi = replay_plan.parse_window(window)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--window") from None
    extra = embedded_mock_args(mock_args, target_url, config_file)
    if target_name and not config_file:
        raise click.UsageError("--target-name picks one of the targets of --config; give --config")
    try:
        tr = trace.read(trace_path, fmt, stop_after=min(hi, lo + max_duration * speed) + READ_SLACK_S)
    except trace.TraceError as exc:
        fail(str(exc))
    cfg = config.load(config_file, target_url)
    tgt = cfg.target(target_name) if cfg.targets else None
    recorded = sorted({r.model for r in tr.requests if r.model})
    if tgt is not None:  # a config lists the models its target serves; a bare URL's are unknown
        served, fallback = (tuple(tgt.models) if config_file else None), tgt.models[0]
    else:  # the embedded mock: it serves the trace's own models, unless --mock-args names some
        mine = [extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "--model"]
        served = tuple(mine) if mine else None
        fallback = mine[0] if mine else (recorded[0] if recorded else "deepseek-chat")
        if not mine and (model or recorded):
            extra += [a for m in ([model] if model else recorded) for a in ("--model", m)]
    fallback = model or fallback
    try:
        plan = replay_plan.plan(tr, (lo, hi), speed, max_requests, max_duration,
                                _model_mapper(model, served, fallback), stream if stream is not None else True, stream)
    except ValueError as exc:
        fail(str(exc))
    if tr.stopped:
        plan.cuts.append(tr.stopped)
    progress, echo = _progress_printer()
    echo(f"trace {trace_path} ({tr.format}): {len(tr.requests)} usable of {tr.lines} lines, {tr.skipped_count} "
         f"malformed; replaying {len(plan.entries)} requests over {plan.span_s:.1f} s")
    for cut in plan.cuts:
        echo(f"cut: {cut}")
    peak = replay_plan.peak_rate(plan.entries)
    if peak > runner.MAX_RATE_PER_PROCESS * processes:  # beyond it the run measures Locust, not the target
        echo(f"note: the replay peaks at {peak:,} requests in one second; one Locust process keeps "
             f"{runner.MAX_RATE_PER_PROCESS:,} req/s (bench/README.md): use --processes "
             f"{-(-peak // runner.MAX_RATE_PER_PROCESS)} or a lower --speed")
    for rec, sent in sorted(plan.models.items()):
        if rec and rec != sent:
            echo(f"note: model {rec} is sent as {sent}")

    def prepare(run_dir: Path) -> None:
        d = run_dir / runner.REPLAY_DIR
        replay_plan.write_schedule(d / "schedule.jsonl", plan.entries)
        summary = {"path": str(trace_path), "format": tr.format, "lines": tr.lines, "usable": len(tr.requests),
                   "skipped_count": tr.skipped_count, "skipped": tr.skipped, "has_latency": tr.has_latency}
        (d / "plan.json").write_text(json.dumps({
            "trace": summary, "scheduled": len(plan.entries), "speed": speed, "window": window, "cuts": plan.cuts,
            "models": plan.models, "max_slowdown": max_slowdown,
            "streamed": sum(1 for e in plan.entries if e["stream"]),
            "recorded": replay_plan.recorded_by_model(plan.entries) if tr.has_latency else {}}, indent=1))

    first = plan.entries[0]
    opts = runner.Options(scenarios=("replay",), target_url=target_url, config=config_file, target_name=target_name,
                          duration=plan.span_s + 1.0, processes=processes, stream=bool(first["stream"]),
                          model=first["model"], mock_args=extra, proxy=proxy, timeout_s=timeout_s, seed=seed,
                          out_dir=out_dir, ignore_eos=ignore_eos)
    say = lambda: echo("opskit loadtest replay: terminated; stopping the mock, the exporter and Locust")  # noqa: E731
    try:
        with sigterm_unwinds(say):
            verdict, run_dir = gate.run(opts, echo, progress, slo_file, prepare=prepare)
    except (runner.RunError, runner.processes.SuperviseError) as exc:
        fail(str(exc))
    click.echo(report.render(verdict))
    section = verdict.summaries.get("replay", {}).get("replay")
    if section:
        click.echo("\n".join(replay_compare.lines(section)))
    click.echo(f"report: {run_dir / 'report.html'}")
    sys.exit(0 if verdict.passed else 1)
