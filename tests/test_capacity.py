"""Capacity search: the pure search and statistics, and the found maximum against the mock's known
capacity (C concurrent generations, each lasting TTFT + N x ITL)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from opskit.loadtest import capacity, capacity_report
from opskit.loadtest.capacity import Level, SearchPlan


def test_wilson_interval_matches_the_textbook_values():
    low, high = capacity.wilson(95, 100)
    assert low == pytest.approx(0.8882, abs=1e-3) and high == pytest.approx(0.9785, abs=1e-3)
    assert capacity.wilson(0, 0) == (0.0, 1.0)
    assert capacity.wilson(10, 10)[1] == 1.0 and capacity.wilson(0, 10)[0] == 0.0


def _synthetic(limit: float):
    def measure(load: float) -> Level:
        ok = load <= limit
        return Level(load=load, duration=10, requests=200, passed=ok, missed=[] if ok else ["ttft_p95"],
                     achieved_rps=min(load, limit), duration_s={"p95": 0.1 if ok else 0.1 + (load - limit)})
    return measure


@pytest.mark.parametrize("limit", [3.0, 37.0, 900.0])
def test_search_ramps_then_bisects_to_the_resolution(limit):
    plan = SearchPlan(start=4.0, factor=2.0, resolution=0.05)
    levels = capacity.search(_synthetic(limit), plan, clock=lambda: 0.0)
    s = capacity.summarize(levels, "rate", "qps")
    low, high = s["interval"]
    assert low <= limit < high and (high - low) / low <= 0.05
    assert s["limiting_slo"] == "ttft_p95" and "breaks first" in s["sentence"]
    assert len(levels) <= 14  # geometric ramp + log bisection, not a linear scan


def test_search_stops_at_the_budget_and_at_the_ceiling():
    t = {"now": 0.0}

    def measure(load):
        t["now"] += 30
        return _synthetic(1e9)(load)

    levels = capacity.search(measure, SearchPlan(start=1, budget_s=100), clock=lambda: t["now"],
                             estimate_s=lambda load: 30)
    assert len(levels) == 3  # a fourth level would end past the budget
    ceiling = capacity.search(_synthetic(1e9), SearchPlan(start=1, max_load=10), clock=lambda: 0.0)
    s = capacity.summarize(ceiling, "rate", "qps")
    assert [lv.load for lv in ceiling] == [1, 2, 4, 8] and "highest load tried" in s["sentence"]


def test_nothing_meets_the_slo():
    levels = capacity.search(_synthetic(0.1), SearchPlan(start=4, min_load=0.5), clock=lambda: 0.0)
    s = capacity.summarize(levels, "rate", "qps")
    assert s["max_load"] is None and s["sentence"].startswith("misses an SLO even at 0.5")


def test_attainment_goodput_and_growth_from_request_rows():
    rows = pd.DataFrame({"ok": [True] * 90 + [False] * 10, "ttft_s": [0.1] * 45 + [0.3] * 35 + [0.9] * 10 + [None] * 10,
                         "duration_s": [1.0] * 100, "t_sched": range(100), "output_tokens": [10] * 100})
    obj = {"ttft_p95_seconds": 0.5, "duration_p90_seconds": 2.0}
    a = capacity.attainment(rows, obj)
    assert a["error_free"]["ratio"] == 0.9 and a["ttft_within"]["ratio"] == 0.8
    assert a["ttft_within"]["low"] < 0.8 < a["ttft_within"]["high"]
    assert int(capacity.good_mask(rows, obj).sum()) == 80
    assert capacity.still_growing(rows)  # the median TTFT of the last third is 3x the first's
    assert not capacity.still_growing(rows.assign(ttft_s=0.1))


def test_knee_headroom_and_report():
    levels = [Level(load=x, duration=10, requests=200, passed=x <= 40, achieved_rps=min(x, 42),
                    duration_s={"p95": 0.2 if x <= 40 else 3.0}, ttft_s={"p95": 0.05}) for x in (10, 20, 40, 80)]
    s = capacity.summarize(levels, "rate", "qps")
    assert s["knee"]["load"] == 40
    ok, line = capacity.headroom_check(s, planned=20, min_headroom=1.5)
    assert ok and "40" in line
    assert not capacity.headroom_check(s, planned=30, min_headroom=1.5)[0]
    assert "meets every SLO up to 40 req/s" in capacity_report.render(s)
    page = capacity_report.html({**s, "objectives": {"ttft_p95_seconds": 0.5}, "target": "<x>"})
    assert "&lt;x&gt;" in page and page.count("<svg") == 3 and ">SLO TTFT p95 &lt; 500 ms<" in page


@pytest.mark.slow
@pytest.mark.serial
def test_found_maximum_matches_the_mocks_known_capacity(tmp_path):
    # 4 generations at a time, each holding its slot for 20 ms to the first token + 9 gaps of 10 ms to the
    # 10th (the mock's latency model: token j is due at TTFT + the gaps before it): 4 / 0.11 s = 36.4 req/s
    mock = ("--capacity 4 --ttft-ms 20 --ttft-jitter-ms 0 --itl-ms 10 --itl-jitter-ms 0 --output-tokens-mean 10 "
            "--output-tokens-spread 0 --seed 1")
    true_capacity = 4 / (0.020 + 9 * 0.010)
    out = tmp_path / "reports"
    proc = subprocess.run([sys.executable, "-m", "opskit", "loadtest", "capacity", "--mock-args", mock, "--start", "16",
                           "--level-duration", "5", "--max-duration", "240", "--planned-rate", "20", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    low, high = summary["interval"]
    # The slot is held a little longer than the schedule (admission, the usage chunk, [DONE]; more on a
    # busy machine): the true capacity is C over the service time the lowest, unqueued level measured.
    served = 4 / summary["levels"][0]["duration_s"]["p50"]
    assert served <= true_capacity * 1.02
    assert summary["max_load"] == pytest.approx(served, rel=0.10), proc.stdout
    assert high is not None and low <= served * 1.02 and high >= served * 0.98
    assert all(lv["requests"] >= capacity.MIN_REQUESTS * 0.9 for lv in summary["levels"])
    assert "CAPACITY (qps, by rate): meets every SLO up to" in proc.stdout and "headroom OK" in proc.stdout
    assert (run_dir / "report.html").read_text().count("<tr>") == len(summary["levels"]) + 1
    # the same run again: not enough headroom for a plan of 30 req/s (needs 45); the saved answer compares
    show = subprocess.run([sys.executable, "-m", "opskit", "report", "show", str(run_dir)], capture_output=True,
                          text=True, timeout=60)
    assert show.returncode == 0 and summary["sentence"] in show.stdout
    same = subprocess.run([sys.executable, "-m", "opskit", "report", "compare", str(run_dir), str(run_dir)],
                          capture_output=True, text=True, timeout=60)
    assert same.returncode == 0 and "max_load_at_slo" in same.stdout
    assert not capacity.headroom_check(summary, planned=30, min_headroom=1.5)[0]
