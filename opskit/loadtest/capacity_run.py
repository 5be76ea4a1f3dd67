"""Run a capacity search for real: one target (the embedded mock unless one is given), one Locust run
per load level in `<run>/level-NN/`, each judged by the gate's own SLO evaluation (opskit.loadtest.slo).

By rate (default) the levels are open-loop `qps` runs at that many requests/s; by users they are
closed-loop `streaming` runs with that many concurrent users.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from opskit.core import config
from opskit.core.cli_helpers import redact_url
from opskit.loadtest import canary, capacity, results, runner, slo
from opskit.loadtest.capacity import Level, SearchPlan
from opskit.loadtest.gate import DEFAULT_SLO_FILE, new_run_dir

SCENARIO_BY = {"rate": "qps", "users": "streaming"}
MIN_LEVEL_S = 8.0


def measure_level(df, meta: dict, load: float, objectives: dict) -> Level:
    """A Level from one level's request rows, judged as the gate judges a scenario."""
    verdict = slo.evaluate(df, objectives, meta)
    s = next(iter(verdict.summaries.values()))
    growing = capacity.still_growing(df) if len(df) else False
    duration = float(s.get("duration") or meta.get("duration") or 1.0)
    good = df[capacity.good_mask(df, objectives)] if len(df) else df
    missed = [c.name for c in verdict.missed] + (["queue_growing"] if growing else [])
    return Level(load=load, duration=duration, requests=int(s["requests"]), passed=not missed, missed=missed,
                 saturated=growing or "achieved_rate_ratio" in missed,
                 achieved_rps=float(s.get("achieved_rate", s["throughput_rps"])),
                 goodput_rps=len(good) / duration,
                 goodput_tokens_s=float(good["output_tokens"].fillna(0).sum()) / duration if len(good) else 0.0,
                 error_ratio=float(s["error_ratio"]), ttft_s=s["ttft_s"] or {}, duration_s=s["duration_s"] or {},
                 attainment=capacity.attainment(df, objectives))


def run(opts: runner.Options, by: str, plan: SearchPlan, slo_file: str | None, echo: Callable[[str], None],
        progress: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> tuple[dict, Path]:
    """Search, write `summary.json` and `report.html` under a new run directory; (summary, run dir)."""
    from opskit.loadtest import capacity_report

    scenario = SCENARIO_BY[by]
    table = slo.load(slo_file or (DEFAULT_SLO_FILE if DEFAULT_SLO_FILE.exists() else None))
    objectives = slo.for_scenario(table, scenario)
    cfg = config.load(opts.config, opts.target_url)
    tgt = cfg.target(opts.target_name) if cfg.targets else None
    model = opts.model or (tgt.models[0] if tgt else "deepseek-chat")
    run_dir = new_run_dir(opts.out_dir)
    target = runner.open_target(opts, run_dir, tgt.base_url if tgt else None)
    locustfile = opts.locustfiles / f"{scenario}.py"

    def one(load: float) -> Level:
        n = sum(1 for p in run_dir.glob("level-*"))
        level_dir = run_dir / f"level-{n:02d}"
        duration = capacity.level_duration(load, by, max(MIN_LEVEL_S, opts.duration))
        lopts = replace(opts, rate=load, duration=duration) if by == "rate" else \
            replace(opts, users=int(round(load)), duration=duration)
        params = runner.scenario_params(lopts, scenario, level_dir, target, model)
        echo(f"[capacity] level {n}: {load:g} {'req/s' if by == 'rate' else 'users'} for {duration:.0f} s")
        runner.run_locust(params, locustfile, level_dir, progress, cpus=target.load_cpus)
        df = results.load(level_dir)
        df = df[df["scenario"] == scenario] if len(df) else df
        level = measure_level(df, runner.meta_for(params), load, objectives)
        echo(f"[capacity] level {n}: {level.requests} requests, "
             f"{'meets every SLO' if level.passed else 'misses ' + ', '.join(level.missed)}")
        return level

    try:
        for note in target.notes:
            echo(f"note: {note}")
        echo(f"target {redact_url(target.url)}; capacity search by {by}; run directory {run_dir}")
        canary.preflight(replace(opts, scenarios=(scenario,)), run_dir, target, model,
                         tgt.auth.scheme if tgt else "none")
        levels = capacity.search(one, plan, clock,
                                 estimate_s=lambda load: capacity.level_duration(load, by, MIN_LEVEL_S) + 5)
    finally:
        target.close()
    summary = capacity.summarize(levels, by, scenario)
    summary.update(run=run_dir.name, target=redact_url(target.url), objectives=objectives,
                   min_requests_per_level=capacity.MIN_REQUESTS)
    # what `opskit report compare` reads, so two searches compare like two gate runs
    summary["scenarios"] = {f"capacity:{scenario}": {k: summary[k] for k in ("max_load", "goodput_rps",
                                                                            "goodput_tokens_s")}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run_dir / "report.html").write_text(capacity_report.html(summary))
    return summary, run_dir
