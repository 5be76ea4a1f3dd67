"""The release gate: run the scenarios, judge them, write reports/<timestamp>/, return the exit status.

A run directory holds summary.json (per-scenario numbers and every check), report.html (verdict
first, then plots, self-contained), log/ (opskit's per-request log, JSONL) and locust/ (Locust's own
CSVs, HTML report and output). Exit status: 0 all objectives met, 1 an objective missed (or a
regression against --baseline), 2 a usage or config error (raised, printed by the CLI).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd

from opskit.core import config, processes, thresholds
from opskit.core.cli_helpers import redact_url
from opskit.loadtest import canary, results, runner, services, slo
from opskit.loadtest.breaker import Breaker
from opskit.loadtest.slo import Check, Verdict

DEFAULT_SLO_FILE = runner.LOCUSTFILES / "slo.yaml"


def new_run_dir(out_dir: Path) -> Path:
    """reports/<UTC timestamp>/, with a suffix if two runs start in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for i in range(100):
        d = out_dir / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
        except OSError as exc:  # --out names a file, an unwritable or impossible place: exit 2, one line
            raise runner.RunError(f"--out: cannot create a run directory under {out_dir}: "
                                  f"{exc.strerror or exc}") from None
    raise runner.RunError(f"cannot create a run directory under {out_dir}")


def reconcile(scenario: str, df: pd.DataFrame, before: dict, after: dict) -> Check:
    """Client counts by status == the proxy's opskit_llm_requests_total delta by code.

    A call the client gave up on before any response (a timeout against a hung upstream: status 0 on
    the client) may still be open at the proxy, which only notices when it relays a byte: such calls
    are matched with the proxy's in-flight gauge and its code-0 records.
    """
    proxy = {c: after.get(c, 0) - before.get(c, 0) for c in set(after) | set(before)}
    in_flight = proxy.pop("in_flight", 0)
    proxy["0"] = proxy.get("0", 0) + in_flight
    proxy = {c: int(v) for c, v in proxy.items() if v}
    sent = df[df["t_sent"].notna()]
    client = {str(k): int(v) for k, v in sent["status"].value_counts().items()}
    diff = sum(abs(client.get(c, 0) - proxy.get(c, 0)) for c in set(client) | set(proxy))
    note = f"client {sum(client.values())} / proxy {sum(proxy.values())}"
    if diff:
        note += f"; by code client {dict(sorted(client.items()))} proxy {dict(sorted(proxy.items()))}"
    return Check(scenario, "proxy_reconciled", diff, "==", 0, diff == 0, note)


def _admin(target: runner.Target, method: str, path: str, body: dict | None = None) -> None:
    """A call to the embedded mock's admin API; a failure is a one-line RunError."""
    try:
        services.http_json(method, target.admin_url + path, body)
    except (OSError, ValueError) as exc:
        raise runner.RunError(f"mock admin API {method} {path} failed: {exc}") from None


def _proxy_counts(target: runner.Target) -> dict | None:
    """The exporter's request counts by code, or None when it cannot be scraped."""
    try:
        return services.requests_by_code(target.metrics_url)
    except (OSError, ValueError):
        return None


def _scenario(opts: runner.Options, name: str, run_dir: Path, target: runner.Target, model: str,
              table: dict, echo: Callable[[str], None], progress: Callable[[str], None],
              prices=None) -> tuple[Verdict, dict]:
    locustfile = opts.locustfiles / f"{name}.py"
    params = runner.scenario_params(opts, name, run_dir, target, model)
    metered = target.metrics_url is not None and params.transport != "ws"
    if params.transport == "ws":
        params = replace(params, base_url=target.url)  # the proxy meters HTTP, not WebSocket
    limits = name == "throttling" and target.admin_url is not None
    if limits:  # the embedded mock enforces the limit this scenario judges, for this scenario only
        _admin(target, "PUT", "/admin/limits", {"rpm": int(params.limit_requests), "window_s": params.window_s})
        _admin(target, "POST", "/admin/reset")
    before = _proxy_counts(target) if metered else {}
    sampler = _engine_sampler(opts, target)
    try:
        rc = runner.run_locust(params, locustfile, run_dir, progress, Breaker.for_scenario(name, thresholds.load()),
                               cpus=target.load_cpus)
    finally:
        if sampler is not None:
            sampler.stop()
        if limits:
            _admin(target, "PUT", "/admin/limits", {"rpm": None})
    after = _proxy_counts(target) if metered else {}
    df = results.load(run_dir)
    df = df[df["scenario"] == name] if len(df) else df
    if not len(df) and rc != 0:
        raise runner.RunError(f"locust failed for {name} (status {rc}): "
                              f"{processes.tail(run_dir / 'locust' / f'{name}.log') or 'no output'}")
    meta = runner.meta_for(params)
    verdict = slo.evaluate(df, slo.for_scenario(table, name), meta)
    verdict.summaries[name]["client_lag_s"] = results.client_lag(run_dir, name)
    if sampler is not None:  # what the server did meanwhile: its queue, KV cache, own TTFT and queue time
        verdict.summaries[name]["engine"] = {**sampler.summary(), "series": sampler.series()}
        target.notes.extend(n for n in sampler.notes() if n not in target.notes)
    if prices is not None and len(df):  # the target's configured prices: what the run cost
        verdict.summaries[name]["cost"] = results.cost(df, prices, model)
    if name == "replay":  # replayed latency beside the trace's recorded latency, per model
        from opskit.loadtest import replay_compare

        plan = json.loads((run_dir / runner.REPLAY_DIR / "plan.json").read_text())
        verdict.summaries[name]["replay"] = section = replay_compare.compare(df, plan)
        if check := replay_compare.slowdown_check(section):
            verdict.checks.append(check)
    if metered and len(df):
        verdict.checks.append(reconcile(name, df, before, after) if before is not None and after is not None
                              else Check(name, "proxy_reconciled", None, "==", 0, False, "exporter unreachable"))
    if opened := runner.circuit_reason(run_dir, name):
        limit = thresholds.load().circuit_error_ratio
        verdict.checks.insert(0, Check(name, "circuit_breaker", opened[1], "<", limit, False, opened[0]))
        echo(f"[{name}] {opened[0]}")
    echo(f"[{name}] done: {len(df)} requests{tokens_and_cost(verdict.summaries.get(name, {}))}")
    return verdict, meta


def tokens_and_cost(s: dict) -> str:
    """"; tokens by type ..., estimated cost ..." for a scenario's console line ("" without tokens)."""
    if not (s.get("input_tokens") or s.get("output_tokens")):
        return ""
    out = (f"; tokens input {s['input_tokens']} (cached {s.get('cached_input_tokens') or 0}), "
           f"output {s['output_tokens']} (reasoning {s.get('reasoning_tokens') or 0})")
    if c := s.get("cost"):
        out += f"; estimated cost {c['total']:.4f} {c['currency']}"
    return out


def _engine_sampler(opts: runner.Options, target: runner.Target):
    """A started sampler of the engine's /metrics (`--engine-metrics`; `mock`: the embedded mock's), or None."""
    if not opts.engine_metrics:
        return None
    from opskit.loadtest.engine_sampler import EngineSampler

    url = target.url.rstrip("/") + "/metrics" if opts.engine_metrics == "mock" else opts.engine_metrics
    sampler = EngineSampler(url)
    sampler.start()
    return sampler


def run(opts: runner.Options, echo: Callable[[str], None], progress: Callable[[str], None],
        slo_file: str | None = None, prepare: Callable[[Path], None] | None = None) -> tuple[Verdict, Path]:
    """Run every scenario and write the run directory. ConfigError / RunError for usage problems.
    `prepare(run_dir)` writes what the scenarios read there before any starts (a replay's schedule)."""
    for name in opts.scenarios:
        if not (opts.locustfiles / f"{name}.py").is_file():
            have = sorted(f.stem for f in opts.locustfiles.glob("*.py") if not f.name.startswith("_"))
            raise runner.RunError(f"unknown scenario {name!r} (no {name}.py in {opts.locustfiles}; "
                                  f"have: {', '.join(have) or 'none'})")
    table = slo.load(slo_file or (DEFAULT_SLO_FILE if DEFAULT_SLO_FILE.exists() else None))
    cfg = config.load(opts.config, opts.target_url)
    tgt = cfg.target(opts.target_name) if cfg.targets else None
    model = opts.model or (tgt.models[0] if tgt else "deepseek-chat")
    run_dir = new_run_dir(opts.out_dir)
    if prepare is not None:
        prepare(run_dir)
    target = runner.open_target(opts, run_dir, tgt.base_url if tgt else None)
    verdict, metas = Verdict(), {}
    try:
        for note in target.notes:
            echo(f"note: {note}")
        echo(f"target {redact_url(target.url)}{' via metering proxy' if target.metrics_url else ''}; "
             f"run directory {run_dir}")
        canary.preflight(opts, run_dir, target, model, tgt.auth.scheme if tgt else "none")
        if opts.scenarios[0] == "throttling" and target.admin_url is None:
            # the canary took one call of the target's rate-limit window and opened it early: the check of
            # calls accepted per window would see two half windows as one; let it pass (the embedded
            # mock's limiter is reset instead)
            wait = runner.scenario_params(opts, "throttling", run_dir, target, model).window_s
            echo(f"note: waiting {wait:g} s for the target's rate-limit window (the canary call counts in it)")
            time.sleep(wait)
        for name in opts.scenarios:
            v, metas[name] = _scenario(opts, name, run_dir, target, model, table, echo, progress,
                                       prices=opts.prices or (tgt.prices if tgt else None))
            verdict.extend(v)
            if runner.circuit_reason(run_dir, name):  # a failing target takes no more load
                skipped = [s for s in opts.scenarios if s not in metas]
                if skipped:
                    echo(f"not run after the circuit opened: {', '.join(skipped)}")
                break
        costs = [s["cost"] for s in verdict.summaries.values() if s.get("cost")]
        if costs:  # what a release test on a paid API cost, said before the verdict
            echo(f"estimated cost of the run: {sum(c['total'] for c in costs):.4f} {costs[0]['currency']} "
                 f"(usage x the configured prices; failed calls with usage included)")
    finally:
        target.close()
    write(run_dir, verdict, metas, redact_url(target.url), target.notes)
    return verdict, run_dir


def write(run_dir: Path, verdict: Verdict, metas: dict, target: str, notes: list[str]) -> None:
    """summary.json and report.html."""
    from opskit.loadtest import plots, report

    summary = {"run": run_dir.name, "target": target, "passed": verdict.passed, "notes": notes,
               "checks": [c.__dict__ for c in verdict.checks], "params": metas, "scenarios": verdict.summaries}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    df = results.load(run_dir)
    slo_lines: dict[str, dict[str, float]] = {}
    for c in verdict.checks:  # the limits the verdict judged, drawn on the latency plots
        if c.name in ("ttft_p95", "duration_p90") and c.limit is not None:
            slo_lines.setdefault(c.scenario, {})[c.name] = c.limit
    figures = plots.all_figures(df, slo_lines, verdict.summaries) if len(df) else {}
    for name, s in verdict.summaries.items():
        if s.get("engine"):
            figures.setdefault(name, []).extend(plots.engine_charts(df[df["scenario"] == name], s["engine"]))
    page = report.html(verdict, figures, title=f"opskit load test {run_dir.name}",
                       meta={"target": target, "python": sys.version.split()[0]}, params=metas)
    (run_dir / "report.html").write_text(page)
