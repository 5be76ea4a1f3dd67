"""Load-test pure parts: arrival schedules, back-off, prompts, results, SLO verdicts, reports, comparison.

No network and no Locust here: synthetic per-request rows go through the same code as real runs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from opskit.cli import main
from opskit.core.config import ConfigError
from opskit.core.thresholds import Thresholds
from opskit.loadtest import compare, report, results, shapes, slo
from opskit.loadtest.prompts import PromptSource, PromptSpec, conversation_messages, load_file

ROOT = Path(__file__).resolve().parent.parent

# ---- arrival schedules and back-off ----


def test_fixed_rate_split_across_workers_is_the_exact_schedule():
    spec = shapes.ArrivalSpec("fixed", rate=50.0)
    one = list(shapes.arrivals(spec, 10.0))
    split = sorted(t for w in range(3) for t in shapes.arrivals(spec, 10.0, w, 3))
    assert len(one) == 500 == shapes.expected_count(spec, 10.0)
    assert split == pytest.approx(one)
    assert one[1] - one[0] == pytest.approx(0.02)


def test_qps_meta_keeps_the_asked_rate_beside_the_drawn_one():
    from opskit.loadtest.params import RunParams
    from opskit.loadtest.runner import meta_for

    p = RunParams(scenario="qps", duration=5.0, workers=2, arrival={"kind": "poisson", "rate": 200.0, "seed": 1})
    meta = meta_for(p)
    assert meta["rate"] == 200.0  # what --rate said; the report's "asked" line shows it
    assert meta["requested_rate"] == meta["scheduled"] / 5.0 != 200.0  # a Poisson draw is judged on itself


def test_poisson_rate_and_ramp_steps():
    poisson = list(shapes.arrivals(shapes.ArrivalSpec("poisson", rate=200.0, seed=7), 20.0))
    assert 3700 < len(poisson) < 4300  # 4000 expected, sd ~63
    gaps = [b - a for a, b in zip(poisson, poisson[1:], strict=False)]
    assert min(gaps) < 0.0005 < 0.02 < max(gaps)  # exponential gaps, not a fixed grid
    ramp = list(shapes.arrivals(shapes.ArrivalSpec("ramp", rate=40.0, steps=4), 8.0))
    per_step = [sum(1 for t in ramp if 2 * j <= t < 2 * (j + 1)) for j in range(4)]
    assert per_step == [20, 40, 60, 80]


def test_retry_after_parsing_and_backoff():
    assert shapes.parse_retry_after("3") == 3.0
    assert shapes.parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert shapes.parse_retry_after(None) is None and shapes.parse_retry_after("soon") is None
    rng = random.Random(1)
    assert shapes.backoff_delay(1, 2.0, rng) == 2.0
    assert shapes.backoff_delay(1, 500.0, rng, cap_s=30.0) == 30.0
    delays = [shapes.backoff_delay(4, None, rng, base_s=0.5, cap_s=3.0) for _ in range(200)]
    assert min(delays) >= 0 and max(delays) <= 3.0 and max(delays) > 2.0  # full jitter up to the cap


# ---- prompts ----


def test_synthetic_prompts_have_the_asked_lengths():
    src = PromptSource(PromptSpec(input_tokens_mean=100, input_tokens_spread=0, output_tokens_mean=30,
                                  output_tokens_spread=0), seed=3)
    messages, max_tokens = src.next()
    assert max_tokens == 30 and messages[0]["role"] == "system"
    assert len(messages[1]["content"].split()) == 100
    assert 380 <= len(messages[1]["content"]) <= 420  # ~4 characters per token


def test_prompt_file_and_its_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hi", "max_tokens": 5}\n\n{"messages": [{"role": "user", "content": "x"}]}\n')
    assert len(load_file(str(good))) == 2
    src = PromptSource(PromptSpec(file=str(good)), seed=1)
    got = [src.next() for _ in range(4)]
    assert {m[0][-1]["content"] for m in got} == {"hi", "x"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_file(str(bad))
    with pytest.raises(ConfigError, match="readable"):
        load_file(str(tmp_path / "missing.jsonl"))


def test_conversation_keeps_system_and_last_turns():
    turns = [(f"q{i}", f"a{i}") for i in range(5)]
    msgs = conversation_messages("sys", turns, "now", keep_turns=2)
    assert [m["content"] for m in msgs] == ["sys", "q3", "a3", "q4", "a4", "now"]


# ---- results ----


def row(scenario="streaming", t=0.0, dur=0.5, ttft=0.1, out=11, status=200, err="", **kw):
    base = {"scenario": scenario, "worker": 0, "user": 0, "seq": 1, "t_sched": t, "t_sent": t,
            "t_end": t + dur, "duration_s": dur, "ttft_s": ttft if not err else None, "ttfot_s": ttft,
            "itl": [0.04] * (out - 1) if not err else None, "status": status, "error_type": err,
            "input_tokens": 20, "output_tokens": out if not err else 0, "tokens_from_usage": True,
            "streamed": True}
    base.update(kw)
    return base


def test_summary_percentiles_tpot_and_error_ratio():
    rows = [row(t=i * 0.1, dur=0.5 + i * 0.001) for i in range(98)]
    rows += [row(t=10.0, status=500, err="server_error"), row(t=10.1, status=0, err="timeout")]
    s = results.summarize(results.frame(rows), {"scenario": "streaming", "duration": 10.0})
    assert s["requests"] == 100 and s["ok"] == 98
    assert s["error_ratio"] == pytest.approx(0.02)
    assert s["errors"] == {"server_error": 1, "timeout": 1}
    assert s["tpot_s"]["p50"] == pytest.approx((0.5485 - 0.1) / 10, rel=1e-3)
    assert s["itl_s"]["p99"] == pytest.approx(0.04)
    assert s["output_tokens"] == 98 * 11 and s["throughput_rps"] == pytest.approx(9.8)


def test_plots_of_a_run_where_every_call_failed_warn_nothing():
    """An unreachable target fails every call; the report's figure must still render, and matplotlib
    must not print legend warnings into the verdict on stderr."""
    import warnings

    from opskit.loadtest import plots

    rows = [row("qps", t=i * 0.1, status=502, err="server_error") for i in range(20)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would fail here instead of reaching the user's terminal
        charts = plots.scenario_charts(results.frame(rows), {"ttft_p95": 0.5})
    # no latency to draw: what is left says how many calls started and which errors came back
    assert [c.question for c in charts] == ["How many requests per second completed?", "Which errors, and when?"]
    assert all(c.svg.startswith("<svg") for c in charts) and "server_error 502: 20" in charts[1].svg


def test_throttling_429s_are_not_errors_and_windows_are_counted():
    rows = [row("throttling", t=i * 0.1, status=200, retry_after=None) for i in range(10)]
    rows += [row("throttling", t=1.0 + i * 0.1, status=429, err="rate_limited", retry_after="4") for i in range(5)]
    rows += [row("throttling", t=1.6, status=429, err="rate_limited", retry_after=None)]
    s = results.summarize(results.frame(rows), {"scenario": "throttling", "duration": 5.0, "window_s": 5.0,
                                                "limit_requests": 8})
    assert s["error_ratio"] == 0.0
    t = s["throttling"]
    assert (t["accepted"], t["rate_limited"], t["missing_retry_after"], t["max_accepted_in_window"]) == (10, 6, 1, 10)
    checks = {c.name: c for c in slo.check_summary(s, slo.defaults())}
    assert not checks["accepted_within_limit"].passed and not checks["retry_after_on_429"].passed
    assert checks["throttled"].passed and checks["no_5xx_when_throttled"].passed
    assert checks["accepted_within_limit"].note == "10 accepted in 5s, limit 8"
    # no --limit-requests: the target's header gives the limit, but not its window, which the note says
    rows = [{**r, "rl_limit_requests": 30} for r in rows]
    s = results.summarize(results.frame(rows), {"scenario": "throttling", "duration": 5.0})
    checks = {c.name: c for c in slo.check_summary(s, slo.defaults())}
    assert checks["accepted_within_limit"].note == ("10 accepted in 60s, limit 30 "
                                                    "(x-ratelimit-limit-requests; window: --limit-window-s)")


def test_max_in_window_opens_windows_like_a_fixed_window_limiter():
    import numpy as np

    # 5 at the end of one window and 5 at the start of the next: fine for a 5-per-window limiter
    times = np.array([0.0, 4.0, 4.2, 4.4, 4.6, 5.0, 5.1, 5.2, 5.3, 5.4])
    assert results.max_in_window(times, 5.0) == 5
    assert results.max_in_window(np.array([0.0, 0.1, 0.2]), 5.0) == 3


# ---- SLO verdicts and reports ----


def test_progress_line_never_shows_more_time_than_the_run_has(tmp_path):
    from opskit.loadtest.runner import progress_line

    missing = tmp_path / "no-history.csv"  # before Locust writes its history: the clock only
    assert progress_line("qps", 2.4, 20, missing) == "[qps]    2s/20s (18s left)"
    assert progress_line("qps", 21.0, 20, missing) == "[qps]   20s/20s (finishing)"


def test_progress_line_counts_errors_as_the_verdict_does(tmp_path):
    from opskit.loadtest.runner import progress_line

    history = tmp_path / "h.csv"
    head = "Timestamp,User Count,Type,Name,Requests/s,Failures/s,95%,Total Request Count,Total Failure Count\n"
    history.write_text(head + "1,8,,Aggregated,0.000000,0.000000,N/A,0,0\n")
    assert progress_line("throttling", 1.0, 20, history) == "[throttling]    1s/20s (19s left)  errors 0/0"
    history.write_text(head + "2,8,,Aggregated,12.5,4.5,340,125,45\n")
    assert progress_line("throttling", 9.0, 20, history, {"rate_limited": 45}) == (
        "[throttling]    9s/20s (11s left)  12.5 req/s  duration p95 340 ms (last 10 s)  errors 0/125  "
        "429s 45 (expected)")
    assert progress_line("qps", 9.0, 20, history, {"rate_limited": 45}).endswith("errors 45/125")


def test_a_non_streamed_run_is_gated_on_duration_not_ttft():
    # a non-streamed call has a duration and no TTFT (DESIGN.md); an old log that still
    # carries ttft = duration for such calls must not bring TTFT back
    rows = [row(t=i * 0.1, dur=0.8, ttft=0.8, streamed=False) for i in range(20)]
    v = slo.evaluate(results.frame(rows), slo.defaults(), {"scenario": "qps", "duration": 2})
    assert [c.name for c in v.checks] == ["duration_p90", "error_ratio"] and v.passed
    s = v.summaries["qps"]
    assert s["ttft_s"]["p95"] is None and s["duration_s"]["p90"] == pytest.approx(0.8)
    text = dict(report.key_numbers(s))
    assert "TTFT p50/p95/p99 ms" not in text and text["duration p50/p95/p99 ms"] == "800.0 / 800.0 / 800.0"
    assert text["timings"] == "not streamed: request duration only (no TTFT, ITL or TPOT)"
    # mixed: TTFT over the streamed calls only
    mixed = rows + [row(t=2 + i * 0.1, dur=0.8, ttft=0.05) for i in range(20)]
    s = slo.evaluate(results.frame(mixed), slo.defaults(), {"scenario": "qps", "duration": 4}).summaries["qps"]
    assert s["ttft_s"]["p95"] == pytest.approx(0.05)
    v = slo.evaluate(results.frame([row(t=i * 0.1) for i in range(20)]), slo.defaults(), {"duration": 2})
    assert [c.note for c in v.checks if c.name == "ttft_p95"] == [""]


def test_tokens_by_type_and_cache_hit_ratio_by_turn_are_reported():
    rows = [row("conversation", t=i * 0.1, turn=i % 2 + 1, input_tokens=100 * (i % 2 + 1),
                cached_input_tokens=64 * (i % 2), reasoning_tokens=3) for i in range(10)]
    s = results.summarize(results.frame(rows), {"scenario": "conversation", "duration": 1})
    assert (s["input_tokens"], s["cached_input_tokens"], s["output_tokens"], s["reasoning_tokens"]) == (1500, 320, 110, 30)
    assert s["by_turn"]["1"]["cache_hit_ratio"] == 0 and s["by_turn"]["2"]["cache_hit_ratio"] == pytest.approx(0.32)
    text = dict(report.key_numbers(s))
    assert text["tokens by type"] == "input 1500 (cached 320), output 110 (reasoning 30)"
    assert text["cache hit ratio by turn"] == "1: 0 %, 2: 32 %"


def test_error_ratio_note_gives_the_statuses_behind_the_error_types():
    rows = [row(t=i * 0.1) for i in range(10)] + [row(t=1.0 + i * 0.1, status=401, err="client_error")
                                                  for i in range(30)]
    rows += [row(t=5.0, status=0, err="timeout"), row(t=5.1, status=200, err="stream_broken")]
    v = slo.evaluate(results.frame(rows), slo.defaults(), {"scenario": "streaming", "duration": 6})
    (check,) = [c for c in v.checks if c.name == "error_ratio"]
    assert check.note == "client_error: 30, stream_broken: 1, timeout: 1 (status 0: 1, 401: 30)"


def test_slo_defaults_come_from_thresholds_and_misses_are_named():
    assert slo.defaults()["ttft_p95_seconds"] == Thresholds().ttft_p95_seconds
    slow = [row(t=i * 0.1, ttft=0.2 + Thresholds().ttft_p95_seconds) for i in range(50)]
    v = slo.evaluate(results.frame(slow), slo.defaults(), {"scenario": "streaming", "duration": 5})
    assert not v.passed and [c.name for c in v.missed] == ["ttft_p95"]
    text = report.render(v)
    assert "VERDICT: FAIL (missed: streaming ttft_p95)" in text
    ok = slo.evaluate(results.frame([row(t=i * 0.1) for i in range(50)]), slo.defaults(), {"duration": 5})
    assert ok.passed and "VERDICT: PASS" in report.render(ok)


def test_qps_achieved_rate_is_checked():
    rows = [row("qps", t=i * 0.1) for i in range(50)]  # 10 req/s sent, 20 asked
    v = slo.evaluate(results.frame(rows), slo.defaults(), {"scenario": "qps", "duration": 5.0, "requested_rate": 20})
    assert [c.name for c in v.missed] == ["achieved_rate_ratio"]


def test_slo_override_file(tmp_path):
    f = tmp_path / "slo.yaml"
    f.write_text("defaults: {error_ratio: 0.1}\nscenarios:\n  qps: {ttft_p95_s: null, duration_p90_s: 3}\n")
    table = slo.load(f)
    qps = slo.for_scenario(table, "qps")
    assert qps["ttft_p95_seconds"] is None and qps["duration_p90_seconds"] == 3 and qps["error_ratio"] == 0.1
    assert slo.for_scenario(table, "streaming")["ttft_p95_seconds"] == Thresholds().ttft_p95_seconds
    f.write_text("scenarios:\n  qps: {ttft_p99: 1}\n")
    with pytest.raises(ConfigError, match="scenarios.qps.ttft_p99"):
        slo.load(f)
    f.write_text("scenarios:\n  qps: {ttft_p95_s: .nan}\n")  # nan would pass every check
    with pytest.raises(ConfigError, match="scenarios.qps.ttft_p95_s: expected a non-negative number or null"):
        slo.load(f)
    f.write_text("scenarios:\n  qps: [\n")
    with pytest.raises(ConfigError) as err:
        slo.load(f)
    assert str(err.value) == f"config error: {f}: line 3: expected valid YAML"  # where, not ParserError
    assert slo.load(ROOT / "loadtests" / "slo.yaml")  # the shipped file is valid


def test_html_report_is_self_contained_verdict_first():
    from opskit.loadtest import plots

    df = results.frame([row(t=i * 0.1) for i in range(30)])
    v = slo.evaluate(df, slo.defaults(), {"duration": 3})
    page = report.html(v, plots.all_figures(df, {"streaming": {"ttft_p95": 0.5}}, v.summaries))
    assert page.index("class='verdict'") < page.index("Checks") < page.index("<svg")
    # inline SVG only: no image file, no URL (not even an XML namespace), no script
    assert "<img" not in page and "http://" not in page and "https://" not in page and "<script" not in page


def test_report_opens_with_a_verdict_paragraph_and_reads_in_words():
    from opskit.loadtest.slo import Check

    v = slo.evaluate(results.frame([row(t=i * 0.1) for i in range(30)]), slo.defaults(), {"duration": 3})
    page = report.html(v, {}, params={"streaming": {"scenario": "streaming", "duration": 3.0, "users": 5,
                                                    "processes": 1, "stream": True, "transport": "sse",
                                                    "model": "deepseek-chat"}})
    assert "<p class='verdict'>PASS: all " in page and "name='viewport'" in page
    assert "<th>asked</th><td>3 s, 5 users, 1 Locust process, streamed (sse), model deepseek-chat</td>" in page
    assert "TTFOT" not in page  # no reasoning tokens: it would repeat TTFT
    v.checks.insert(0, Check("streaming", "circuit_breaker", 0.5, "<", 0.15, False, "stopped: circuit open after 3 s"))
    assert report.verdict_paragraph(v) == (f"FAIL: 1 of {len(v.checks)} checks missed (streaming). "
                                           "streaming: stopped: circuit open after 3 s. streaming: 30 calls at "
                                           "10.0 req/s, TTFT p95 100.0 ms, duration p90 500.0 ms, no errors.")


# ---- comparison ----


def summary_file(path, ttft_p95, rps, errors=0.0):
    data = {"scenarios": {"streaming": {"ttft_s": {"p50": 0.05, "p95": ttft_p95, "p99": ttft_p95},
                                        "throughput_rps": rps, "error_ratio": errors}}}
    path.mkdir()
    (path / "summary.json").write_text(json.dumps(data))
    return path


def test_compare_flags_regressions_beyond_tolerance(tmp_path):
    base = compare.load_summary(summary_file(tmp_path / "a", 0.100, 50.0))
    same = compare.load_summary(summary_file(tmp_path / "b", 0.105, 48.0))
    worse = compare.load_summary(summary_file(tmp_path / "c", 0.130, 40.0, errors=0.02))
    assert not compare.compare(base, same)["regressed"].any()
    table = compare.compare(base, worse)
    assert set(table[table["regressed"]]["metric"]) == {"ttft_p95_s", "ttft_p99_s", "throughput_rps", "error_ratio"}
    assert "COMPARE: REGRESSION in streaming ttft_p95, " in compare.render(table)  # the unit is on the values


def test_compare_says_missing_and_names_an_unfinished_run(tmp_path):
    base = compare.load_summary(summary_file(tmp_path / "a", 0.100, 50.0))
    new = {"scenarios": {"streaming": {"throughput_rps": 50.0, "error_ratio": 1.0}}}  # every call failed: no TTFT
    table = compare.compare(base, new)
    out = compare.render(table)
    assert "streaming     ttft_p95            100.00 ms      missing       n/a  MISSING in NEW" in out
    assert out.splitlines()[-1].startswith("COMPARE: REGRESSION in streaming ttft_p50, streaming ttft_p95")
    unfinished = tmp_path / "unfinished"
    (unfinished / "log").mkdir(parents=True)
    res = CliRunner().invoke(main, ["report", "compare", str(tmp_path / "a"), str(unfinished)])
    assert res.exit_code == 2 and res.output.startswith(f"Error: {unfinished}: this run did not finish")


def test_report_compare_cli_exit_codes(tmp_path):
    a, c = summary_file(tmp_path / "a", 0.1, 50.0), summary_file(tmp_path / "c", 0.2, 50.0)
    runner = CliRunner()
    assert runner.invoke(main, ["report", "compare", str(a), str(a)]).exit_code == 0
    res = runner.invoke(main, ["report", "compare", str(a), str(c)])
    assert res.exit_code == 1 and "REGRESSED" in res.output
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "summary.json").write_text("{not json")
    res = runner.invoke(main, ["report", "compare", str(a), str(tmp_path / "junk")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip() == (f"opskit: config error: {tmp_path / 'junk' / 'summary.json'}: "
                                  "expected a run's summary.json (it is not valid JSON)")
    res = runner.invoke(main, ["report", "show", str(tmp_path)])  # a directory without a summary
    assert res.exit_code == 2
    assert res.output.strip() == (f"opskit: config error: {tmp_path / 'summary.json'}: "
                                  "expected a run's summary.json (No such file or directory)")
    (tmp_path / "qps").mkdir()
    (tmp_path / "qps" / "summary.json").write_text(json.dumps({"scenarios": {"qps": {"throughput_rps": 20.0}}}))
    res = runner.invoke(main, ["report", "compare", str(a), str(tmp_path / "qps")])  # nothing to compare: not a pass
    assert res.exit_code == 2
    assert res.output.strip() == "Error: BASE and NEW have no scenario in common (BASE: streaming; NEW: qps)"
    res = runner.invoke(main, ["loadtest", "qps", "--baseline", str(a)])  # refused before any load is sent
    assert res.exit_code == 2
    assert res.output.strip() == f"Error: --baseline {a} has none of the scenarios to run (it has: streaming)"


def test_out_dir_that_cannot_be_made_is_one_line_exit_2(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "reports"  # under a regular file: no directory can be made there
    res = CliRunner().invoke(main, ["loadtest", "qps", "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip() == f"opskit loadtest: --out: cannot create a run directory under {out}: Not a directory"


def test_unavailable_metering_proxy_degrades_to_direct(tmp_path, monkeypatch):
    from opskit.core.processes import SuperviseError
    from opskit.loadtest import runner, services

    def broken(*_a, **_kw):
        raise SuperviseError("opskit exporter exited with status 2: config error")

    monkeypatch.setattr(services, "start_exporter", broken)
    target = runner.open_target(runner.Options(proxy=True), tmp_path, "http://127.0.0.1:9")
    assert target.send_url == target.url == "http://127.0.0.1:9" and target.metrics_url is None
    assert "going direct" in target.notes[0]


def test_reconcile_counts_calls_still_open_at_the_proxy():
    from opskit.loadtest.gate import reconcile

    rows = [row(t=i * 0.1) for i in range(5)] + [row(t=1.0, status=0, err="timeout")]
    rows.append({**row(t=1.1, status=0, err="connection"), "t_sent": None})  # dropped: never sent
    df = results.frame(rows)
    before = {"200": 10.0, "in_flight": 0.0}
    ok = reconcile("qps", df, before, {"200": 15.0, "in_flight": 1.0})  # the timed-out call is still open there
    assert ok.passed and ok.note == "client 6 / proxy 6"
    lost = reconcile("qps", df, before, {"200": 14.0, "in_flight": 1.0})
    assert not lost.passed and lost.value == 1 and "by code" in lost.note


def test_gate_objectives_come_from_the_thresholds_and_slo_yaml_uses_their_names(tmp_path, monkeypatch):
    override = tmp_path / "thresholds.yaml"
    override.write_text("ttft_p95_seconds: 0.7\nachieved_rate_ratio: 0.9\nthrottling_limit_tolerance: 0.1\n")
    monkeypatch.setenv("OPSKIT_THRESHOLDS", str(override))
    d = slo.defaults()
    assert d["ttft_p95_seconds"] == 0.7 and d["achieved_rate_ratio"] == 0.9
    assert d["throttling_limit_tolerance"] == 0.1 and d["error_ratio"] == Thresholds().error_ratio
    f = tmp_path / "slo.yaml"
    f.write_text("scenarios:\n  qps: {achieved_rate_ratio: 0.99, duration_p90_seconds: null}\n")
    qps = slo.for_scenario(slo.load(f), "qps")
    assert qps["achieved_rate_ratio"] == 0.99 and qps["duration_p90_seconds"] is None
    assert qps["ttft_p95_seconds"] == 0.7  # the thresholds file still applies where slo.yaml is silent


def test_a_bad_thresholds_file_breaks_no_import(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("ttft_p95_seconds: fast\n")
    env = {**os.environ, "OPSKIT_THRESHOLDS": str(bad)}
    code = ("import opskit.core.catalog, opskit.loadtest.slo, opskit.opscode.alert_rules, opskit.sidecar.call_metrics;"
            "print('imported')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr
    res = subprocess.run([sys.executable, "-m", "opskit", "generate", "alerts", "--check"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "ttft_p95_seconds" in res.stderr and "Traceback" not in res.stderr


def test_capacity_limits_count_every_process_and_only_the_scenarios_they_apply_to():
    from opskit.loadtest.runner import MAX_RATE_PER_PROCESS, MAX_USERS_PER_PROCESS, Options, capacity_problem

    assert capacity_problem(Options(scenarios=("qps",), rate=MAX_RATE_PER_PROCESS)) is None
    assert capacity_problem(Options(scenarios=("qps",), rate=2 * MAX_RATE_PER_PROCESS, processes=2)) is None
    assert "--processes 2 " in capacity_problem(Options(scenarios=("qps",), rate=MAX_RATE_PER_PROCESS + 1))
    assert capacity_problem(Options(scenarios=("streaming",), rate=1e12)) is None  # --rate is qps's alone
    assert capacity_problem(Options(scenarios=("qps",), users=10**6)) is None      # qps: one scheduler a process
    assert capacity_problem(Options(scenarios=("throttling",), users=MAX_USERS_PER_PROCESS)) is None
    assert "--users 1,001" in capacity_problem(Options(scenarios=("throttling",), users=MAX_USERS_PER_PROCESS + 1))


def test_cost_of_a_run_at_the_targets_prices():
    from opskit.core import pricing
    prices = pricing.parse({"currency": "USD", "per_million_tokens": {"m": {"input": 1.0, "cached_input": 0.1,
                                                                            "output": 2.0}}})
    rows = [row(t=i * 0.1, input_tokens=1000, cached_input_tokens=500, out=100, wall=1767614400.0 + i)
            for i in range(10)]
    s = results.summarize(results.frame(rows), {"scenario": "streaming", "duration": 1})
    s["cost"] = results.cost(results.frame(rows), prices, "m")
    # per call: 500 x 1.0 + 500 x 0.1 + 100 x 2.0 = 750 per million
    assert s["cost"] == {"currency": "USD", "total": pytest.approx(0.0075), "by_model": {"m": pytest.approx(0.0075)},
                         "unpriced_calls": 0}
    assert dict(report.key_numbers(s))["estimated cost"] == "0.0075 USD (m 0.0075)"
    assert results.cost(results.frame(rows), prices, "other")["unpriced_calls"] == 10
