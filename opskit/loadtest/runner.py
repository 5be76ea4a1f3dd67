"""Run scenarios: target (or the embedded mock), metering proxy, Locust subprocesses, results, verdict.

Locust always runs as a subprocess (never imported here): one standalone process, or with
`processes > 1` a master plus that many workers, each told its share of the work through
$OPSKIT_LT_PARAMS. A live progress line comes from Locust's own stats-history CSV, which the master
rewrites every second. The numbers that decide the verdict come from opskit's own request log.

Requests go through `opskit exporter`'s metering proxy unless `proxy=False`; at the end of each
scenario the client's counts by HTTP status are reconciled with the proxy's
opskit_llm_requests_total (nothing lost, nothing invented). When the exporter cannot start, the run
goes direct and says so.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from opskit.core import processes
from opskit.core.processes import Child
from opskit.loadtest import placement, services, shapes
from opskit.loadtest.breaker import Breaker, read_counts
from opskit.loadtest.params import ENV, FATAL_PREFIX, RunParams
from opskit.shipped import folder

SCENARIOS = ("qps", "streaming", "throttling", "conversation")
DEFAULT_SCENARIOS = SCENARIOS
LOCUSTFILES = folder("loadtests")
REPLAY_DIR = "replay"  # <run>/replay/: a trace replay's schedule.jsonl and plan.json


@dataclass
class Options:
    """Everything `opskit loadtest` was asked for. None = the scenario's default."""

    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    target_url: str | None = None
    config: str | None = None
    target_name: str | None = None
    duration: float = 20.0
    rate: float | None = None
    arrival: str = "fixed"
    users: int | None = None
    processes: int = 1
    stream: bool = True
    transport: str = "sse"
    model: str | None = None
    prompt: dict = field(default_factory=dict)
    mock_args: list[str] = field(default_factory=list)
    proxy: bool = True
    limit_requests: float | None = None
    window_s: float | None = None
    overdrive: float = 2.0
    turns: int = 4
    keep_turns: int = 3
    timeout_s: float = 30.0
    seed: int = 1
    out_dir: Path = Path("reports")
    locustfiles: Path = LOCUSTFILES
    engine_metrics: str | None = None  # a model server's /metrics URL sampled during each scenario
    prices: object | None = None       # opskit.core.pricing.Prices for the run's cost (--prices), else the target's
    ignore_eos: bool = False           # replay: ask vLLM/SGLang for exactly the recorded output length
    placement: bool = True             # helpers and Locust on different cores (opskit.loadtest.placement)


# Defaults per scenario, sized so all four run in well under make loadtest's 3 minutes on 2 cores.
SCENARIO_DEFAULTS = {
    "qps": {"rate": 20.0},
    "streaming": {"users": 50},
    "throttling": {"users": 8, "limit_requests": 20, "window_s": 5.0},
    "conversation": {"users": 10},
}


# What one Locust process does on one core (bench/README.md, "loadgen"): it keeps an open-loop rate within
# 1 % up to 2,500 req/s, and reads 1,000 concurrent streams with its own loop lag p99 ~3 ms (a quiet core).
# Beyond these a run measures the generator rather than the target, and far beyond them (`--rate 1e12`,
# `--users 1000000`) it never ended. More load: more processes, or more machines (distributed Locust).
MAX_RATE_PER_PROCESS = 2500
MAX_USERS_PER_PROCESS = 1000
MAX_PROCESSES = 64
DISTRIBUTED = "distributed Locust (deploy/locust-release-job.yaml, README: Load beyond one machine)"


def capacity_problem(opts: Options) -> str | None:
    """Why this run asks more than its Locust processes can generate (one line naming the limit and the
    way to more load), or None."""
    asks = []
    if opts.rate is not None and "qps" in opts.scenarios:
        asks.append(("--rate", opts.rate, MAX_RATE_PER_PROCESS, "offers at most {:,} req/s"))
    if opts.users is not None and set(opts.scenarios) - {"qps"}:  # qps runs one scheduler per process
        asks.append(("--users", opts.users, MAX_USERS_PER_PROCESS, "runs at most {:,} users"))
    for flag, value, per_process, limit in asks:
        if value <= per_process * opts.processes:
            continue
        need = math.ceil(value / per_process)
        more = (f"use --processes {need} (a core each) or {DISTRIBUTED}" if need <= MAX_PROCESSES
                else f"more than one machine's {MAX_PROCESSES} processes: use {DISTRIBUTED}")
        shown = f"{value:,.0f}" if float(value).is_integer() else f"{value:g}"
        return (f"{flag} {shown}: one Locust process {limit.format(per_process)} (bench/README.md), so "
                f"{per_process * opts.processes:,} with --processes {opts.processes}; {more}")
    return None


@dataclass
class Target:
    """Where requests go, and what helpers were started for it."""

    url: str                      # the real target (or the embedded mock)
    send_url: str                 # where Locust sends: the proxy when metering, else `url`
    admin_url: str | None = None  # the embedded mock's admin API
    metrics_url: str | None = None
    children: list[Child] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_cpus: frozenset[int] | None = None  # where Locust runs when helpers were placed apart from it

    def close(self) -> None:
        """Stop the helpers this target started (exporter first, then the mock)."""
        for c in reversed(self.children):
            processes.stop(c)


def open_target(opts: Options, run_dir: Path, target_url: str | None) -> Target:
    """Start the embedded mock when there is no target, then the metering proxy in front of it."""
    t = Target(url=target_url or "", send_url=target_url or "")
    place = placement.plan() if opts.placement else None
    helpers = place.helpers if place else None
    try:  # each helper is listed in t.children as it starts, so an interruption stops it
        if target_url is None:
            _, info = services.start_mock(run_dir, opts.mock_args, into=t.children, cpus=helpers)
            t.url = t.send_url = info["url"]
            t.admin_url = info["admin_url"]
        if opts.proxy and opts.transport != "ws":  # the proxy meters HTTP; a WebSocket run never passes it
            try:
                _, info = services.start_exporter(run_dir, t.url, opts.config, into=t.children, cpus=helpers)
                t.send_url, t.metrics_url = info["proxy_url"], info["url"]
            except processes.SuperviseError as exc:
                t.notes.append(f"metering proxy unavailable, going direct ({exc})")
    except BaseException:  # interrupted (SIGTERM, Ctrl-C) while starting: the caller has no Target to close
        t.close()
        raise
    # nothing to keep apart from when Locust runs alone; and more Locust processes than the cores left
    # to them need every core (the helpers' too) more than they need to be kept off the helpers' one
    if place is not None and t.children and opts.processes <= len(place.load):
        t.load_cpus = place.load
    return t


def scenario_params(opts: Options, scenario: str, run_dir: Path, target: Target, model: str) -> RunParams:
    """The RunParams every Locust process of this scenario gets (worker index set per process)."""
    d = SCENARIO_DEFAULTS.get(scenario, {})
    users = opts.users or d.get("users", 10)
    rate = opts.rate or d.get("rate", 10.0)
    limit = opts.limit_requests or (d.get("limit_requests") if target.admin_url else None)
    window = opts.window_s or (d.get("window_s") if target.admin_url else None) or 60.0
    if scenario in ("qps", "replay"):
        users = opts.processes  # one scheduler per process
    schedule = str(run_dir / REPLAY_DIR / "schedule.jsonl") if scenario == "replay" else None
    return RunParams(scenario=scenario, run_dir=str(run_dir), base_url=target.send_url, config_path=opts.config,
                     target_url=opts.target_url, target_name=opts.target_name, model=model,
                     duration=opts.duration, users=users, workers=opts.processes, seed=opts.seed,
                     timeout_s=opts.timeout_s, stream=opts.stream, transport=opts.transport, prompt=opts.prompt,
                     arrival={"kind": opts.arrival, "rate": rate, "seed": opts.seed}, limit_requests=limit,
                     window_s=window, overdrive=opts.overdrive, turns=opts.turns, keep_turns=opts.keep_turns,
                     schedule=schedule, ignore_eos=opts.ignore_eos)


def meta_for(p: RunParams) -> dict:
    """What the results need to know about what was asked."""
    meta = {"scenario": p.scenario, "duration": p.duration, "users": p.users, "processes": p.workers,
            "stream": p.stream, "transport": p.transport, "model": p.model}
    if p.scenario == "qps":
        spec = shapes.ArrivalSpec(**p.arrival)
        # the schedule the workers actually walk (seeded): a Poisson run is judged on its own draws
        scheduled = sum(sum(1 for _ in shapes.arrivals(spec, p.duration, w, p.workers)) for w in range(p.workers))
        # `rate` is what was asked (--rate), kept beside the drawn rate so the report shows both
        meta.update(arrival=spec.kind, rate=spec.rate, requested_rate=scheduled / p.duration, scheduled=scheduled)
    if p.scenario == "replay":  # the trace's arrivals, as planned (replay_cli writes plan.json first)
        plan = json.loads((Path(p.run_dir) / REPLAY_DIR / "plan.json").read_text())
        meta.update(arrival="trace", scheduled=plan["scheduled"], requested_rate=plan["scheduled"] / p.duration,
                    speed=plan["speed"], streamed=plan.get("streamed"),
                    model=", ".join(sorted(set(plan["models"].values()))) or p.model,
                    trace={k: plan["trace"][k] for k in ("path", "format", "lines", "usable", "skipped_count")})
    if p.scenario == "throttling":
        meta.update(limit_requests=p.limit_requests, window_s=p.window_s, overdrive=p.overdrive)
    if p.scenario == "conversation":
        meta.update(turns=p.turns, keep_turns=p.keep_turns)
    return meta


def _locust_argv(p: RunParams, locustfile: Path, prefix: Path, role: list[str]) -> list[str]:
    # users stop starting requests at `duration` themselves; the grace lets the last ones finish
    run_time = math.ceil(p.duration) + 1
    return [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", str(p.users),
            "-r", str(max(p.users, 1)), "--run-time", f"{run_time}s", "--stop-timeout", str(int(p.timeout_s) + 2),
            "--csv", str(prefix), "--html", str(prefix) + ".html", "--only-summary", "--loglevel", "WARNING",
            "--exit-code-on-error", "0", *role]


def run_locust(p: RunParams, locustfile: Path, run_dir: Path, progress: Callable[[str], None],
               breaker: Breaker | None = None, cpus: frozenset[int] | None = None) -> int:
    """Run one scenario's Locust processes to the end; returns the master's exit status, or raises
    RunError with the line a Locust process wrote when it could not go on (it is stopped early).
    With a breaker, the run stops early when it opens (circuit_reason then says why); with `cpus`,
    every Locust process runs there (Target.load_cpus)."""
    ldir = run_dir / "locust"
    prefix = ldir / p.scenario
    env = dict(os.environ)
    children: list[Child] = []
    log = ldir / f"{p.scenario}.log"
    try:
        if p.workers <= 1:
            env[ENV] = p.to_env()
            master, proc = processes.spawn("locust", _locust_argv(p, locustfile, prefix, []), log, env,
                                           into=children)
        else:
            port = processes.free_port()
            env[ENV] = p.to_env()
            role = ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                    "--expect-workers", str(p.workers), "--expect-workers-max-wait", "30"]
            master, proc = processes.spawn("locust", _locust_argv(p, locustfile, prefix, role), log, env,
                                           into=children)
            for i in range(p.workers):
                wenv = {**env, ENV: replace(p, worker=i).to_env()}
                processes.spawn(f"locust worker {i}", [sys.executable, "-m", "locust", "-f", str(locustfile),
                                                       "--worker", "--master-host", "127.0.0.1", "--master-port",
                                                       str(port), "--loglevel", "WARNING"],
                                ldir / f"{p.scenario}-worker{i}.log", wenv, into=children)
        for c in children:
            placement.pin(c.pid, cpus)
        _watch(master, proc, p, prefix, progress, run_dir, breaker)
        if fatal := fatal_reason(run_dir, p.scenario):  # refused credentials: a config error, not a verdict
            raise RunError(f"[{p.scenario}] {fatal}")
        return proc.returncode
    finally:
        # interrupted (Ctrl-C, SIGTERM): no report will be written, and a CI runner's SIGKILL may follow
        # within seconds, so Locust gets 2 s to stop instead of the 10 s a finished run allows
        grace = 2.0 if sys.exc_info()[0] is not None else 10.0
        for c in children:
            processes.stop(c, timeout=grace)


def fatal_reason(run_dir: Path, scenario: str) -> str | None:
    """The line a Locust process wrote when it could not go on (credentials refused), or None."""
    for path in sorted((run_dir / "log").glob(f"{FATAL_PREFIX}{scenario}-*.txt")):
        try:
            line = path.read_text().strip()
        except OSError:
            continue
        if line:
            return line.splitlines()[0]
    return None


def circuit_reason(run_dir: Path, scenario: str) -> tuple[str, float] | None:
    """(reason, error ratio) when the circuit breaker stopped this scenario, else None."""
    try:
        data = json.loads((run_dir / "log" / f"circuit-{scenario}.json").read_text())
        return str(data["reason"]), float(data["ratio"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _watch(master: Child, proc: subprocess.Popen, p: RunParams, prefix: Path,
           progress: Callable[[str], None], run_dir: Path, breaker: Breaker | None = None) -> None:
    """Wait for the master, reporting progress every second; stop it early when a Locust process could
    not go on (fatal_reason) or the circuit breaker opens, and kill it if it overruns badly.

    An open circuit is written to log/circuit-<scenario>.json, where the users look: they start no more
    requests, and Locust is stopped once the calls in flight have ended (every one logged), or after
    the request timeout."""
    start = time.monotonic()
    limit = p.duration + p.timeout_s + 60
    history = Path(str(prefix) + "_stats_history.csv")
    opened_at, last = None, None
    while proc.poll() is None:
        elapsed = time.monotonic() - start
        counts = read_counts(prefix) if breaker is not None else None
        if opened_at is None and counts is not None and (opened := breaker.observe(elapsed, *counts)):
            (run_dir / "log").mkdir(exist_ok=True)
            (run_dir / "log" / f"circuit-{p.scenario}.json").write_text(
                json.dumps({"reason": opened[0], "ratio": opened[1]}))
            opened_at = elapsed
        settled = opened_at is not None and (elapsed - opened_at >= 2 and counts == last
                                             or elapsed - opened_at > p.timeout_s + 2)
        last = counts
        if elapsed > limit or settled or fatal_reason(run_dir, p.scenario):
            processes.stop(master, timeout=p.timeout_s + 5 if settled else 5.0)
            proc.poll()
            break
        progress(progress_line(p.scenario, elapsed, p.duration, history, (counts or read_counts(prefix) or (0, {}))[1]))
        time.sleep(1.0)


def progress_line(scenario: str, elapsed: float, duration: float, history: Path,
                  failures: dict[str, int] | None = None) -> str:
    """`[qps] 12s/20s (8s left)  48.9 req/s  duration p95 123 ms (last 10 s)  errors 0/580` from Locust's
    history CSV; with `failures` by error type, throttling's expected 429s are shown apart from errors
    (as the verdict counts them). Numbers Locust has not got yet (0 req/s, p95 N/A) are left out."""
    if elapsed >= duration:  # the grace after the deadline, while the last calls finish: not "5s/4s"
        line = f"[{scenario}] {duration:4g}s/{duration:g}s (finishing)"
    else:
        line = f"[{scenario}] {elapsed:4.0f}s/{duration:g}s ({duration - elapsed:.0f}s left)"
    try:
        with history.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return line
    if not rows:
        return line
    last = rows[-1]
    with contextlib.suppress(ValueError):
        if (rps := float(last.get("Requests/s") or 0)) > 0:
            line += f"  {rps:.1f} req/s"
    if (p95 := last.get("95%")) and p95 != "N/A":  # Locust's: whole calls (users report full durations)
        line += f"  duration p95 {p95} ms (last 10 s)"
    total, failed = last.get("Total Request Count", "0"), last.get("Total Failure Count", "0")
    expected = (failures or {}).get("rate_limited", 0) if scenario == "throttling" else 0
    with contextlib.suppress(ValueError):
        failed = str(int(float(failed)) - expected)
    line += f"  errors {failed}/{total}" + (f"  429s {expected} (expected)" if expected else "")
    return line


class RunError(Exception):
    """A usage problem found while running (unknown scenario, Locust would not start): exit 2."""
