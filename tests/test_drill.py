"""The fire drill: time compression of the rules, the phase plan against the real rules and routing,
the verdict logic, and a short live drill against real Prometheus/Alertmanager (the full drill is
`make drill`)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from opskit.core.thresholds import Thresholds
from opskit.live import drill_plan, stack
from opskit.live.drill_plan import (
    PHASES,
    Phase,
    Seen,
    compress_expr,
    compress_rules,
    compress_window,
    phase_misses,
)
from opskit.opscode import routing, rules_file
from tests.conftest import ROOT, need_binary

# ---------------------------------------------------------------- time compression (pure)


@pytest.mark.parametrize("window,expected", [
    ("5m", "10s"), ("9m", "18s"), ("30m", "20s"), ("3d", "20s"), ("24h", "20s"), ("1m", "10s"), ("1h30m", "20s"),
])
def test_compress_window_scales_and_clamps(window, expected):
    assert compress_window(window) == expected


def test_seconds_rejects_garbage():
    with pytest.raises(ValueError):
        drill_plan.seconds("5 minutes")
    assert drill_plan.seconds("1h30m") == 5400 and drill_plan.seconds("500ms") == 0.5


def test_compress_expr_touches_only_range_windows():
    expr = 'rate(x_total{a="[5m]"}[5m]) / max_over_time(y[1h:1m]) and target:y:ratio_rate5m > 0.5'
    # A label value that looks like a window is not followed by `]` inside a selector... but it is
    # inside quotes; the drill's rules never put brackets in label values, and promtool checks them.
    out = compress_expr(expr)
    assert "[10s])" in out and "[20s:1m]" in out and "ratio_rate5m > 0.5" in out


def _rendered() -> str:
    return rules_file.render_rules(Thresholds(), short_for=drill_plan.SHORT_FOR)


def test_compress_rules_keeps_every_rule_and_threshold():
    original = yaml.safe_load(_rendered())
    compressed = yaml.safe_load(compress_rules(_rendered()))
    before = [r for g in original["groups"] for r in g["rules"]]
    after = [r for g in compressed["groups"] for r in g["rules"]]
    assert [r.get("alert") or r["record"] for r in after] == [r.get("alert") or r["record"] for r in before]
    for b, a in zip(before, after, strict=True):
        strip = lambda e: re.sub(r"(\[|offset )[0-9a-z]+", r"\1W", e)  # noqa: E731
        assert strip(a["expr"]) == strip(b["expr"])          # thresholds and selectors untouched
        windows = re.findall(r"\[(\d+)s[\]:]", a["expr"]) + re.findall(r"offset (\d+)s\b", a["expr"])
        assert all(10 <= int(w) <= 20 for w in windows)
        assert a.get("for") == (drill_plan.SHORT_FOR if "for" in b else None)
        assert a.get("labels") == b.get("labels") and a.get("annotations") == b.get("annotations")


def test_compressed_rules_pass_promtool(tmp_path):
    promtool = need_binary("promtool")
    f = tmp_path / "drill.rules.yml"
    f.write_text(compress_rules(_rendered()))
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compress_rules_rejects_a_non_rules_file():
    with pytest.raises(ValueError, match="groups"):
        compress_rules("just: text\n")


# ---------------------------------------------------------------- the plan against the real rules


def test_every_alert_the_plan_names_exists_with_a_routed_severity():
    severities = drill_plan.alert_severities(_rendered())
    for phase in PHASES:
        for name in phase.required | phase.allowed:
            assert name in severities, f"{phase.name}: {name} is not an alert of alerts/"
        for name in phase.required:
            assert severities[name] in routing.SEVERITY_RECEIVER, name


def test_every_llm_and_gpu_alert_is_drilled():
    # An alert no phase fires is an alert no drill ever proved; list deliberate exceptions here.
    undrilled = {"LLMQuotaNearlyExhausted"}  # needs 80 % of a day's quota in one window
    # The drill's KV phase preempts for sure, but its usage swings around 90 % as requests are pushed
    # back, so the KV alert may fire there (allowed) without being required; the GPU-idle ticket needs
    # the fake GPU and may fire with the queue phase. Both are promtool-tested (llm_engine.test.yml).
    undrilled |= {"LLMEngineKVCacheNearlyFull", "LLMEngineGPUIdleWhileQueued"}
    drilled = {n for p in PHASES for n in p.required}
    assert set(drill_plan.alert_severities(_rendered())) - drilled == undrilled


def test_phase_names_are_unique_and_hold_phases_expect_nothing():
    assert len(drill_plan.PHASE_NAMES) == len(set(drill_plan.PHASE_NAMES))
    for p in PHASES:
        assert bool(p.required) != bool(p.hold_s), p.name


# ---------------------------------------------------------------- verdicts (pure)

SEV = {"A": "warning", "B": "critical", "C": "warning"}
ROUTES = {"warning": "chat", "critical": "pager"}
PHASE = Phase("p", "test", required=frozenset({"A"}), allowed=frozenset({"C"}), scope={"target": "mock"})


def _good(name="A", receiver="chat", severity="warning") -> Seen:
    return Seen(pending_at=1, firing_at=2, delivered_at=3, receiver=receiver,
                labels={"alertname": name, "severity": severity, "target": "mock"}, inactive_at=10, resolved_at=11)


def test_a_clean_phase_has_no_misses():
    assert phase_misses(PHASE, {"A": _good(), "C": _good("C")}, SEV, ROUTES) == []


def test_pending_only_other_alerts_are_not_misses():
    assert phase_misses(PHASE, {"A": _good(), "B": Seen(pending_at=1, inactive_at=5)}, SEV, ROUTES) == []


@pytest.mark.parametrize("seen,expected", [
    ({}, "A: never went pending"),
    ({"A": Seen(pending_at=1, inactive_at=2)}, "A: was pending but never fired"),
    ({"A": Seen(pending_at=1, firing_at=2, inactive_at=4)}, "A: fired but never reached the receiver"),
    ({"A": Seen(pending_at=1, firing_at=2, delivered_at=3, receiver="chat",
                labels={"alertname": "A", "severity": "warning", "target": "mock"})},
     "A: still active after the fault was cleared"),
    ({"A": Seen(pending_at=1, firing_at=2, delivered_at=3, receiver="chat",
                labels={"alertname": "A", "severity": "warning", "target": "mock"}, inactive_at=5)},
     "A: resolved in Prometheus but no resolved notification arrived"),
    ({"A": _good(receiver="pager")}, "A: routed to receiver 'pager', expected 'chat'"),
    ({"A": _good(), "B": _good("B", "pager", "critical")}, "B: fired, but p should not fire it"),
])
def test_each_kind_of_miss_is_named(seen, expected):
    assert expected in phase_misses(PHASE, seen, SEV, ROUTES)


def test_wrong_labels_are_named():
    s = _good()
    s.labels["target"] = "other"
    (miss,) = phase_misses(PHASE, {"A": s}, SEV, ROUTES)
    assert "target" in miss and "'other'" in miss and "'mock'" in miss


def test_an_inhibited_alert_needs_no_notification():
    s = Seen(pending_at=1, firing_at=2, inhibited_at=3, inactive_at=9)
    assert phase_misses(PHASE, {"A": s}, SEV, ROUTES) == []


def test_an_alert_missing_from_the_rules_is_named():
    assert phase_misses(Phase("p", "t", required=frozenset({"Nope"})), {}, SEV, None) == \
        ["Nope: no such alert in the rules"]


# ---------------------------------------------------------------- live (real binaries)


def _need_stack_binaries():
    need_binary("prometheus")
    need_binary("prometheus-alertmanager")
    from opskit.live import fake_gpu

    if reason := fake_gpu.unavailable_reason():
        pytest.skip(reason)


@pytest.mark.slow
def test_live_drill_passes_a_real_fault_and_catches_a_missing_alert(tmp_path, capsys):
    # One stack: the GPU fault must pass end to end; a fault too weak to alert must be a miss.
    from opskit.live import drill

    _need_stack_binaries()
    project = drill.load_project()
    spec = stack.StackSpec(state_dir=tmp_path, timing=drill.DRILL_TIMING, probe_interval_s=1.0,
                           rules={"drill.rules.yml": project.rules}, alertmanager_yml=project.alertmanager_yml,
                           gpu="fake")
    gpu_busy = next(p for p in PHASES if p.name == "gpu-busy")
    too_weak = Phase("gpu-warm", "GPU 0 at 50 %", gpu={"util": 50}, required=frozenset({"GPUHighUtilization"}),
                     scope={"gpu": "0"})
    st = stack.up(spec)
    try:
        t0 = time.monotonic()
        misses = asyncio.run(drill.drive(st, project, [gpu_busy, too_weak], rps=10, timeout_s=12, gpu=True,
                                         dashboards=False))
        elapsed = time.monotonic() - t0
    finally:
        stack.down(tmp_path)
    out = capsys.readouterr().out
    assert misses == ["gpu-warm: GPUHighUtilization: never went pending"], out
    assert elapsed < 120
    row = next(line for line in out.splitlines() if "GPUHighUtilization" in line and "required" in line)
    assert row.split()[-1] == "chat"  # warning severity routed to the chat receiver


@pytest.mark.slow
def test_drill_cli_runs_one_phase_and_stops_everything():
    _need_stack_binaries()
    r = subprocess.run([sys.executable, "-m", "opskit", "drill", "--phase", "gpu-busy", "--rps", "10",
                        "--phase-timeout", "30", "--max-seconds", "150"],
                       capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"drill finished in \d+s: PASS", r.stdout)
    state_dir = re.search(r"state dir (\S+)\)", r.stdout).group(1)
    assert not (ROOT / state_dir).exists()  # removed after a passing drill
    # Every process the drill started named its state dir on its command line; none is left.
    assert _processes_mentioning(state_dir) == []
    assert "Traceback" not in r.stderr


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue  # exited while we looked
        if text in args:
            found.append(args)
    return found


def test_restore_puts_back_exactly_what_a_phase_changed():
    before = {"error_rate": {"502": 0.01}, "extra_ttft_ms": 0.0, "hang_rate": 0.0}
    assert drill_plan.restore({"error_rate": {"500": 0.05, "502": 0.5}}, before) == \
        {"error_rate": {"500": 0, "502": 0.01}}
    assert drill_plan.restore({"extra_ttft_ms": 1000}, before) == {"extra_ttft_ms": 0.0}
    limits = {"rpm": None, "tpm": None, "daily_quota": None, "window_s": 60.0}
    assert drill_plan.restore({"rpm": 5, "tpm": 10, "window_s": 1}, limits) == {"rpm": None, "tpm": None, "window_s": 60.0}
