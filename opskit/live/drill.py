"""`opskit drill`: an alert fire drill against a live local stack.

It starts a private stack (mock, exporter with the fake GPU, Prometheus with the project's rules
compressed in time, Alertmanager with the project's routing, webhook receiver), drives light load
through the exporter's metering proxy, then injects each fault of opskit.live.drill_plan.PHASES through
the mock's admin API (or the fake GPU's state file). For each it checks that the expected alerts go
pending, fire, reach the receiver with the right labels and route, and resolve once the fault is
cleared, and that no other alert fires. At the end every dashboard panel's query must return data
from the live Prometheus. It prints time to detect, deliver and resolve per alert, exits 1 on any
miss, and always stops the stack.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import click

from opskit.core.cli_helpers import FiniteRange, sigterm_unwinds
from opskit.live import drill_dcgm, drill_plan, stack
from opskit.live.alert_receiver import read_notifications
from opskit.live.drill_plan import PHASES, Phase, Seen
from opskit.live.stack_config import DRILL_TIMING

POLL_S = 0.5


@dataclass
class Project:
    """What the drill takes from the source tree: rules, routing, dashboards (when present)."""

    rules: str
    severities: dict[str, str]
    alertmanager_yml: str | None
    routes: dict[str, str] | None
    queries: list[tuple[str, str, str]] | None


def load_project() -> Project:
    """The project's rules (rendered from the thresholds), routing and dashboard queries."""
    from opskit.core import thresholds
    from opskit.opscode import routing, rules_file
    from opskit.opscode.dashboards import all_queries

    text = drill_plan.compress_rules(rules_file.render_rules(thresholds.load(), short_for=drill_plan.SHORT_FOR,
                                                             gpu_source=drill_dcgm.GPU_SOURCE))
    return Project(text, drill_dcgm.severities(drill_plan.alert_severities(text)), rules_file.render_alertmanager(),
                   dict(routing.SEVERITY_RECEIVER), all_queries())


class Load:
    """Open-loop streaming chat calls through the proxy at `rps`, counted by HTTP status (0 = none)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, rps: float, max_in_flight: int = 200) -> None:
        self.session, self.url, self.rps, self.cap = session, url, rps, max_in_flight
        self.codes: collections.Counter[int] = collections.Counter()
        self.in_flight, self.paused, self.body = 0, False, drill_plan.REQUEST_BODY

    async def run(self) -> None:
        """Send calls until cancelled."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                if not self.paused and self.in_flight < self.cap:  # beyond the cap: skipped, not queued
                    t = asyncio.create_task(self._one())
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                due += 1.0 / self.rps
                await asyncio.sleep(max(0.0, due - loop.time()))
        finally:
            for t in list(tasks):
                t.cancel()

    async def _one(self) -> None:
        self.in_flight += 1
        try:
            async with self.session.post(self.url, json=self.body, timeout=aiohttp.ClientTimeout(total=15)) as r:
                async for _ in r.content.iter_any():
                    pass
                self.codes[r.status] += 1
        except (aiohttp.ClientError, TimeoutError):
            self.codes[0] += 1
        finally:
            self.in_flight -= 1


@dataclass
class Watcher:
    """Polls Prometheus' and Alertmanager's alerts and the receiver's file into `Seen` records."""

    session: aiohttp.ClientSession
    prom: str
    am: str
    notifications: str
    offset: int = 0
    active: set[str] = field(default_factory=set)

    async def _get(self, url: str):
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            return await r.json()

    async def poll(self, seen: dict[str, Seen], cleared_at: float | None) -> None:
        """Update `seen` from one look at Prometheus, Alertmanager and the receiver's file."""
        now = time.time()
        body = await self._get(self.prom + "/api/v1/alerts")
        self.active = set()
        for a in body["data"]["alerts"]:
            name = drill_dcgm.alert_key(a["labels"])
            s = seen.setdefault(name, Seen())
            self.active.add(name)
            s.pending_at = s.pending_at or now
            if a["state"] == "firing":
                s.firing_at = s.firing_at or now
        for name, s in seen.items():
            s.active = name in self.active
            if cleared_at is not None:
                s.inactive_at = (s.inactive_at or now) if not s.active else None
        for a in await self._get(self.am + "/api/v2/alerts?inhibited=true&silenced=true&unprocessed=true"):
            if a["status"].get("inhibitedBy") and drill_dcgm.alert_key(a["labels"]) in seen:
                s = seen[drill_dcgm.alert_key(a["labels"])]
                s.inhibited_at = s.inhibited_at or now
        self._read_notifications(seen, cleared_at)

    def _read_notifications(self, seen: dict[str, Seen], cleared_at: float | None) -> None:
        payloads = read_notifications(self.notifications)
        for p in payloads[self.offset:]:
            for a in p.get("alerts", []):
                s = seen.setdefault(drill_dcgm.alert_key(a["labels"]), Seen())
                at = p["received_at"]
                if a["status"] == "firing" and s.delivered_at is None:
                    s.delivered_at, s.receiver, s.labels = at, p.get("receiver"), dict(a["labels"])
                    s.firing_at = s.firing_at or at  # it fired, even if between two polls
                elif a["status"] == "resolved" and cleared_at is not None and at >= cleared_at:
                    s.resolved_at = s.resolved_at or at
        self.offset = len(payloads)

    def skip_notifications(self) -> None:
        """Start the next phase after everything received so far."""
        self.offset = len(read_notifications(self.notifications))


async def _admin(session: aiohttp.ClientSession, admin_url: str, section: str, body: dict | None = None) -> dict:
    """GET (body None) or PUT one section of the mock's admin API; its settings afterwards."""
    url, timeout = f"{admin_url}/admin/{section}", aiohttp.ClientTimeout(total=5)
    call = session.get(url, timeout=timeout) if body is None else session.put(url, json=body, timeout=timeout)
    async with call as r:
        if r.status != 200:
            raise stack.StackError(f"mock admin {r.method} /admin/{section} answered {r.status}: {(await r.text())[:200]}")
        return await r.json()


async def apply(phase: Phase, ctx: dict, inject: bool) -> None:
    """Inject a phase's fault, or clear it (the mock's settings as they were before it)."""
    session, admin, saved = ctx["session"], ctx["admin"], ctx.setdefault("saved", {})
    for section, changes in phase.mock.items():
        if inject:
            saved[section] = await _admin(session, admin, section)
            await _admin(session, admin, section, changes)
        else:
            await _admin(session, admin, section, drill_plan.restore(changes, saved[section]))
    if phase.body:
        ctx["load"].body = {**drill_plan.REQUEST_BODY, **phase.body} if inject else drill_plan.REQUEST_BODY
    if phase.gpu is not None and ctx["gpu_state"]:
        from opskit.live import fake_gpu

        fake_gpu.set_gpu(Path(ctx["gpu_state"]), **(phase.gpu if inject else {}))
    if phase.stop_exporter:
        # Calls in flight through a frozen proxy would time out and count as errors after it
        # thaws: pause the load while the exporter is frozen.
        ctx["load"].paused = inject
        freeze(ctx["exporter_pid"], inject)


def freeze(pid: int, stopped: bool) -> None:
    """SIGSTOP (or SIGCONT) a stack component's process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGSTOP if stopped else signal.SIGCONT)


def _detected(phase: Phase, seen: dict[str, Seen], started: float) -> bool:
    if not phase.required:
        return time.time() - started >= phase.hold_s
    return all(n in seen and seen[n].firing_at and (seen[n].delivered_at or seen[n].inhibited_at)
               for n in phase.required)


def _resolved(seen: dict[str, Seen]) -> bool:
    return all(s.inactive_at and (s.delivered_at is None or s.resolved_at) for s in seen.values())


async def run_phase(phase: Phase, ctx: dict, timeout_s: float) -> tuple[dict[str, Seen], float, float]:
    """Inject, watch until detected, clear, watch until resolved: (seen, injected at, cleared at)."""
    watcher: Watcher = ctx["watcher"]
    watcher.skip_notifications()
    seen: dict[str, Seen] = {}
    t0 = time.time()
    await apply(phase, ctx, inject=True)
    while time.time() - t0 < timeout_s and not _detected(phase, seen, t0):
        await asyncio.sleep(POLL_S)
        await watcher.poll(seen, None)
    t1 = time.time()
    await apply(phase, ctx, inject=False)
    while time.time() - t1 < timeout_s:
        await asyncio.sleep(POLL_S)
        await watcher.poll(seen, t1)
        if _resolved(seen):
            break
    return seen, t0, t1


def _since(t: float | None, t0: float) -> str:
    return f"{t - t0:6.1f}s" if t is not None else "     - "


def report_phase(phase: Phase, seen: dict[str, Seen], t0: float, t1: float) -> list[str]:
    """Table rows: alert, role, pending/firing/delivered after injection, resolved after clearing."""
    rows = []
    for name in sorted(set(seen) | phase.required):
        s = seen.get(name, Seen())
        role = "required" if name in phase.required else "allowed" if name in phase.allowed else "UNEXPECTED"
        if s.firing_at is None and role != "required":
            role = "pending only"
        delivered = _since(s.delivered_at, t0) if s.delivered_at or not s.inhibited_at else "inhibit"
        rows.append(f"  {name:<30} {role:<12} {_since(s.pending_at, t0)} {_since(s.firing_at, t0)} "
                    f"{delivered:>7} {_since(s.resolved_at or s.inactive_at, t1)}  {s.receiver or ''}")
    return rows


async def settle(watcher: Watcher, timeout_s: float) -> list[str]:
    """Wait until no alert is pending or firing; the names still active after `timeout_s`."""
    deadline = time.time() + timeout_s
    seen: dict[str, Seen] = {}
    while True:
        await watcher.poll(seen, None)
        if not watcher.active or time.time() > deadline:
            return sorted(watcher.active)
        await asyncio.sleep(POLL_S)


async def check_dashboards(session: aiohttp.ClientSession, prom: str, queries, gpu: bool) -> tuple[list[str], int]:
    """(one line per panel query with no data, number of queries run)."""
    misses, ran = [], 0
    for board, panel, expr in queries:
        if not gpu and "opskit_gpu_" in expr:
            continue
        ran += 1
        async with session.get(prom + "/api/v1/query", params={"query": expr},
                               timeout=aiohttp.ClientTimeout(total=10)) as r:
            body = await r.json()
        if body.get("status") != "success" or not body["data"]["result"]:
            misses.append(f"dashboard {board!r}, panel {panel!r}: no data for {expr}")
    return misses, ran


async def warm_up(session: aiohttp.ClientSession, prom: str, load: Load, timeout_s: float) -> str | None:
    """Wait until the recording rules see the load (p95 TTFT is a number); a reason on failure."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        async with session.get(prom + "/api/v1/query", params={"query": "target:opskit_llm_ttft_seconds:p95_5m"},
                               timeout=aiohttp.ClientTimeout(total=5)) as r:
            result = (await r.json())["data"]["result"]
        if result and result[0]["value"][1] not in ("NaN", "+Inf"):
            return None
        await asyncio.sleep(POLL_S)
    return f"warm-up: no TTFT reached Prometheus within {timeout_s:.0f}s (calls by status: {dict(load.codes)})"


async def run_phases(phases: list[Phase], ctx: dict, project: Project, timeout_s: float) -> list[str]:
    """Each phase in turn, its table printed; every miss, one line each."""
    misses = []
    for phase in phases:
        click.echo(f"\n{phase.name}: {phase.what}")
        click.echo(f"  {'alert':<30} {'role':<12} {'pending':>7} {'firing':>7} {'deliver':>7} {'resolve':>7}  receiver")
        seen, t0, t1 = await run_phase(phase, ctx, timeout_s)
        click.echo("\n".join(report_phase(phase, seen, t0, t1)) or "  (no alert went pending)")
        found = drill_plan.phase_misses(phase, seen, project.severities, project.routes)
        click.echo("  " + ("; ".join(found) if found else "ok"))
        misses += [f"{phase.name}: {m}" for m in found]
        if left := await settle(ctx["watcher"], timeout_s):
            misses.append(f"{phase.name}: {', '.join(left)} still active {timeout_s:.0f}s after clearing")
    return misses


async def drive(st: stack.Stack, project: Project, phases: list[Phase], rps: float, timeout_s: float,
                gpu: bool, dashboards: bool = True) -> list[str]:
    """Run the phases against a started stack, then (with `dashboards`) every panel query; every
    miss, one line each. Panels only all have data after every phase ran (429s, errors, ...)."""
    async with aiohttp.ClientSession() as session:
        prom = st.url("prometheus")
        watcher = Watcher(session, prom, st.url("alertmanager"), st.files["notifications"])
        load = Load(session, st.url("exporter", "proxy_url") + "/chat/completions", rps)
        ctx = {"session": session, "admin": st.url("mock", "admin_url"), "watcher": watcher, "load": load,
               "gpu_state": st.files.get("fake_nvml_state"),
               "exporter_pid": next(c.child.pid for c in st.components if c.child.name == "exporter")}
        load_task = asyncio.create_task(load.run())
        try:
            if reason := await warm_up(session, prom, load, 40.0):
                return [reason]
            if left := await settle(watcher, 30.0):
                return [f"baseline: {', '.join(left)} active with no fault injected"]
            misses = await run_phases(phases, ctx, project, timeout_s)
            if dashboards and project.queries is not None:
                bad, ran = await check_dashboards(session, prom, project.queries, gpu)
                click.echo(f"\ndashboards: {ran - len(bad)}/{ran} panel queries returned data")
                misses += bad
            click.echo(f"load: calls by HTTP status {dict(sorted(load.codes.items()))}")
            return misses
        finally:
            load_task.cancel()
            freeze(ctx["exporter_pid"], False)  # never leave it frozen (down would need SIGKILL)


def run(spec: stack.StackSpec, project: Project, phases: list[Phase], rps: float, phase_timeout: float,
        deadline: float, gpu: bool) -> list[str]:
    """Bring the stack up and drive the phases until `deadline` (monotonic); every miss, one line
    each. The caller stops the stack (also after an interrupt)."""
    try:
        st = stack.up(spec)
        click.echo(f"stack up (state dir {spec.state_dir})")
        everything = len(phases) == len(PHASES)
        if not everything:
            click.echo("dashboards: not checked (their panels only all have data after every phase)")
        return asyncio.run(asyncio.wait_for(drive(st, project, phases, rps, phase_timeout, gpu, everything),
                                            max(1.0, deadline - time.monotonic())))
    except TimeoutError:
        return ["the drill ran past --max-seconds"]
    except stack.StackError as exc:
        return [str(exc)]
    except (aiohttp.ClientError, OSError, ValueError, KeyError) as exc:
        # Prometheus, Alertmanager or the mock stopped answering, or answered nonsense.
        return [f"drill aborted: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"]
    except KeyboardInterrupt:
        return ["interrupted"]


@click.command()
@click.option("--phase", "phase_names", multiple=True, type=click.Choice(drill_plan.PHASE_NAMES),
              help="Run only these phases (repeatable; default: all).")
@click.option("--rps", type=FiniteRange(1, 200), default=20.0, show_default=True,
              help="Streaming calls per second through the proxy.")
@click.option("--phase-timeout", type=FiniteRange(5, 300), default=45.0, show_default=True,
              help="Seconds for a fault's alerts to fire, and again to resolve.")
@click.option("--max-seconds", type=FiniteRange(30, 3600), default=480.0, show_default=True,
              help="The whole drill's time limit, seconds.")
@click.option("--keep", is_flag=True, help="Keep the stack's state dir (configs, logs) even on success.")
def drill(phase_names: tuple[str, ...], rps: float, phase_timeout: float, max_seconds: float, keep: bool) -> None:
    """Fire drill: inject faults into a live stack and check every alert fires, notifies and resolves.

    Starts a private stack of its own (not `opskit stack`'s); exit 1 on any miss.

    \b
    Examples:
      opskit drill                                     # every phase, then every dashboard query
      opskit drill --phase errors --phase ttft --keep  # a subset; keep configs and logs
    """
    from opskit.live import fake_gpu

    try:
        project = load_project()
    except stack.StackError as exc:
        raise click.ClickException(str(exc)) from None
    phases = [drill_dcgm.both_sources(p) for p in PHASES if not phase_names or p.name in phase_names]
    no_gpu = fake_gpu.unavailable_reason()
    if no_gpu:
        click.echo(f"GPU phases skipped: {no_gpu}")
        phases = [p for p in phases if not p.needs_gpu]
    state_dir = Path(tempfile.mkdtemp(prefix="opskit-drill-"))
    spec = stack.StackSpec(state_dir=state_dir, timing=DRILL_TIMING, probe_interval_s=1.0,
                           rules={"drill.rules.yml": project.rules}, alertmanager_yml=project.alertmanager_yml,
                           gpu="off" if no_gpu else "fake", fake_dcgm=True, engine="vllm",
                           spend_daily_budget=drill_plan.SPEND_BUDGET_PER_RPS * rps)
    started = time.monotonic()
    try:
        with sigterm_unwinds():  # unwind, so the stack is stopped
            misses = run(spec, project, phases, rps, phase_timeout, started + max_seconds, gpu=not no_gpu)
    finally:
        stack.down(state_dir)
    if misses or keep:
        click.echo(f"configs and logs kept in {state_dir}")
    else:
        shutil.rmtree(state_dir, ignore_errors=True)
    click.echo(f"\ndrill finished in {time.monotonic() - started:.0f}s: "
               + ("PASS" if not misses else f"FAIL, {len(misses)} miss(es)"))
    for m in misses:
        click.echo(f"  MISS {m}")
    sys.exit(1 if misses else 0)
