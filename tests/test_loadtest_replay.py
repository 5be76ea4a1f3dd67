"""Trace replay: the three trace formats parsed from samples in their published schemas, malformed lines
counted, the schedule (window, speed, caps, models), the synthetic prompts' shared prefixes, and a
replay of a ~15 s call log against the embedded mock with its arrivals checked against the trace."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from opskit.loadtest import replay_compare, replay_plan, trace
from opskit.loadtest.replay_plan import PromptBuilder

DATA = Path(__file__).parent / "data"
CALLLOG = DATA / "calllog"
MOONCAKE = DATA / "mooncake_sample.jsonl"
AZURE = DATA / "azure_sample.csv"


def _plan(tr, window=(0.0, math.inf), speed=1.0, max_requests=None, max_duration=None, model="m", stream=None):
    return replay_plan.plan(tr, window, speed, max_requests, max_duration, lambda rec: rec or model, True, stream)


def test_formats_are_detected_from_their_first_line():
    assert trace.detect(CALLLOG) == "opskit"
    assert trace.detect(MOONCAKE) == "mooncake"
    assert trace.detect(AZURE) == "azure"


def test_mooncake_sample_parsed_with_its_512_token_blocks():
    tr = trace.read(MOONCAKE)
    first = json.loads(MOONCAKE.read_text().splitlines()[0])
    assert (tr.format, len(tr.requests), tr.skipped_count) == ("mooncake", 30, 0)
    r = tr.requests[0]
    assert r.t == first["timestamp"] / 1000 and r.input_tokens == first["input_length"]
    assert r.output_tokens == first["output_length"] and r.model is None and r.stream is None
    # one block per hash id, 512 tokens each but the last, which holds what is left of the prompt
    assert [k for k, _ in r.blocks] == [f"m{h}" for h in first["hash_ids"]]
    assert sum(n for _, n in r.blocks) == r.input_tokens and all(n == 512 for _, n in r.blocks[:-1])
    assert not tr.has_latency


def test_azure_sample_parsed_with_sub_second_timestamps():
    tr = trace.read(AZURE)
    rows = AZURE.read_text().splitlines()
    assert (tr.format, len(tr.requests), tr.lines) == ("azure", len(rows) - 1, len(rows) - 1)
    ts, ctx, gen = rows[1].split(",")
    assert tr.requests[0].input_tokens == int(ctx) and tr.requests[0].output_tokens == int(gen)
    # 2023-11-16 18:15:47.2688673 -> 7 fractional digits kept to the microsecond
    assert tr.requests[0].t % 60 == pytest.approx(float(ts.rsplit(":", 1)[1]), abs=1e-5)
    gaps = [b.t - a.t for a, b in zip(tr.requests, tr.requests[1:], strict=False)]
    assert all(0.19 < g < 0.81 for g in gaps)  # the sample's 0.2-0.8 s spacing survives parsing
    assert not tr.has_latency and all(not r.blocks for r in tr.requests)


def test_call_log_directory_of_gzip_and_plain_files():
    tr = trace.read(CALLLOG)
    records = [json.loads(line) for p in sorted(CALLLOG.iterdir())
               for line in (gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()).splitlines()]
    assert (tr.format, len(tr.requests), tr.skipped_count) == ("opskit", len(records), 0)
    assert tr.has_latency and [r.t for r in tr.requests] == sorted(r.t for r in tr.requests)
    by_line = {(r.source, r.line): r for r in tr.requests}
    rec = records[0]
    r = by_line[("calls-20261201T091344Z.jsonl.gz", 1)]
    assert (r.model, r.stream, r.input_tokens, r.output_tokens) == (rec["model"], rec["stream"],
                                                                    rec["tokens"]["input"], rec["tokens"]["output"])
    assert (r.duration_s, r.ttft_s) == (rec["duration_s"], rec["ttft_s"])
    assert [k for k, _ in r.blocks] == rec["prefix_hashes"][:len(r.blocks)] and all(n == 64 for _, n in r.blocks)
    failed = [r for r in tr.requests if not r.ok]
    assert len(failed) == sum(1 for x in records if x["status"] != 200)
    assert all(r.duration_s is None for r in failed)  # a 429's latency is not compared with a success's
    # no output recorded (the 429): max_tokens is what it asked for
    assert all(r.output_tokens == 512 for r in failed)


def test_malformed_lines_are_skipped_and_counted_with_their_numbers(tmp_path):
    good = json.loads(MOONCAKE.read_text().splitlines()[0])
    lines = [json.dumps(good), "{not json", json.dumps({**good, "input_length": -3}), "", "[1, 2]",
             json.dumps({**good, "timestamp": "soon"}), json.dumps({**good, "hash_ids": "abc"}), json.dumps(good)]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(lines) + "\n")
    tr = trace.read(f, "mooncake")
    assert len(tr.requests) == 2 and tr.skipped_count == 5 and tr.lines == 7
    assert [n for _, n, _ in tr.skipped] == [2, 3, 5, 6, 7]
    assert "input_length" in tr.skipped[1][2]
    csv = tmp_path / "a.csv"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,5\n"
                   "2023-11-16 18:15:47,ten,5\n,1,1\n2023-11-16 18:15:48.1,3\n2023-11-16 18:15:49.5,7,2\n")
    tr = trace.read(csv)
    assert len(tr.requests) == 2 and [n for _, n, _ in tr.skipped] == [3, 4, 5]


def test_a_call_log_cut_short_keeps_what_was_read(tmp_path):
    raw = (CALLLOG / "calls-20261201T091344Z.jsonl.gz").read_bytes()
    (tmp_path / "calls-1.jsonl.gz").write_bytes(raw[: len(raw) * 2 // 3])
    tr = trace.read(tmp_path / "calls-1.jsonl.gz", "opskit")
    assert 0 < len(tr.requests) < 16 and tr.skipped_count >= 1 and "breaks off" in tr.skipped[-1][2]


@pytest.mark.parametrize("content", ["", "{bad\n\n{also bad\n", '{"timestamp": 1}\n'])
def test_no_usable_line_is_one_line_exit_2(tmp_path, content):
    f = tmp_path / "trace.jsonl"
    f.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "opskit", "loadtest", "replay", "--trace", str(f), "--format",
                           "mooncake", "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no usable mooncake trace line" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing started, no run directory


def test_unknown_format_is_one_line_exit_2(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"hello": 1}\n')
    proc = subprocess.run([sys.executable, "-m", "opskit", "loadtest", "replay", "--trace", str(f)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--format" in proc.stderr


def test_window_speed_and_caps_say_what_was_cut():
    tr = trace.read(MOONCAKE)
    full = _plan(tr)
    t0 = tr.requests[0].t
    assert len(full.entries) == 30 and not full.cuts and full.entries[0]["at"] == 0
    assert full.span_s == pytest.approx(tr.requests[-1].t - t0)
    fast = _plan(tr, speed=2)
    assert [e["at"] for e in fast.entries] == pytest.approx([e["at"] / 2 for e in full.entries])
    win = _plan(tr, window=(5.0, 10.0))
    inside = [r for r in tr.requests if 5 <= r.t - t0 < 10]
    assert len(win.entries) == len(inside) and win.entries[0]["at"] == 0  # replayed from its first request
    assert win.cuts == [f"--window 5..10: {len(inside)} of 30 requests"]
    capped = _plan(tr, max_requests=7, max_duration=6.0)
    assert len(capped.entries) == 7 and len(capped.cuts) == 2 and all("--max-" in c for c in capped.cuts)
    short = _plan(tr, max_duration=3.0)
    assert short.span_s <= 3.0 and "replayed the first" in short.cuts[0]
    with pytest.raises(ValueError, match="holds no request"):
        _plan(tr, window=(1000.0, 2000.0))
    assert replay_plan.peak_rate(full.entries) <= 5 and replay_plan.peak_rate(fast.entries) >= \
        replay_plan.peak_rate(full.entries)
    assert replay_plan.peak_rate([{"at": t} for t in (0, 0.1, 0.2, 1.15, 1.3, 5)]) == 3
    assert replay_plan.parse_window("600..") == (600.0, math.inf)
    for bad in ("5", "9..3", "-1..4", "a..b"):
        with pytest.raises(ValueError):
            replay_plan.parse_window(bad)


def test_models_and_stream_flags_as_recorded_or_overridden():
    tr = trace.read(CALLLOG)
    plan = _plan(tr)
    assert {e["model"] for e in plan.entries} == {"deepseek-chat", "deepseek-reasoner"}
    assert [e["stream"] for e in plan.entries] == [r.stream for r in tr.requests]
    assert all(e["model"] == "m" for e in _plan(trace.read(AZURE)).entries)  # no model in the trace
    assert not any(e["stream"] for e in _plan(tr, stream=False).entries)
    mapped = replay_plan.plan(tr, (0, math.inf), 1, None, None, lambda rec: "x" if rec == "deepseek-reasoner" else rec,
                              True)
    assert mapped.models == {"deepseek-chat": "deepseek-chat", "deepseek-reasoner": "x"}


def test_equal_prefix_keys_give_equal_text_and_lengths_match():
    b = PromptBuilder(run_seed=1)
    shared = [["aa", 64], ["bb", 64]]
    p1 = b.prompt({"i": 1, "input": 200, "blocks": shared})
    p2 = PromptBuilder(run_seed=1).prompt({"i": 2, "input": 300, "blocks": shared + [["cc", 64]]})
    other = b.prompt({"i": 3, "input": 200, "blocks": [["zz", 64], ["bb", 64]]})
    head = len(b.block("aa", 64)) + 1 + len(b.block("bb", 64))
    assert p1[:head] == p2[:head] and p1[head:] != p2[head:head + len(p1) - head]
    assert other[:head] != p1[:head]
    assert len(p1.split()) == 200 and len(p2.split()) == 300  # one word a token
    assert len(b.block("aa", 64)) == 64 * 4 - 1  # 4 characters a token with the spaces


def test_comparison_says_faster_or_slower_and_when_nothing_was_recorded():
    plan = {"trace": {"format": "opskit", "has_latency": True, "skipped_count": 1, "skipped": [["", 4, "bad"]],
                      "lines": 5}, "speed": 1, "models": {"a": "a"}, "max_slowdown": 0.1,
            "recorded": {"a": {"ok": 3, "requests": 3, "duration_p50_s": 1.0, "duration_p95_s": 2.0,
                               "ttft_p50_s": 0.2, "ttft_p95_s": 0.4, "output_tokens_mean": 10}}}
    df = pd.DataFrame({"rec_model": ["a"] * 3, "ok": [True] * 3, "streamed": [True] * 3,
                       "duration_s": [0.5, 0.5, 0.5], "ttft_s": [0.3, 0.3, 0.3], "output_tokens": [10.0] * 3})
    c = replay_compare.compare(df, plan)
    row = c["by_model"]["a"]
    assert row["ratio"]["duration_p50_s"] == pytest.approx(0.5) and row["ratio"]["ttft_p50_s"] == pytest.approx(1.5)
    text = "\n".join(replay_compare.lines(c))
    assert "50 % faster" in text and "50 % slower" in text and "lines 4" in text
    check = replay_compare.slowdown_check(c)
    assert check.passed and check.value == pytest.approx(0.25)
    slow = replay_compare.compare(df.assign(duration_s=3.0), plan)
    assert not replay_compare.slowdown_check(slow).passed
    none = replay_compare.compare(df, {**plan, "recorded": {}, "trace": {**plan["trace"], "format": "azure",
                                                                          "has_latency": False}})
    assert "recorded latency: none" in "\n".join(replay_compare.lines(none))
    assert not replay_compare.slowdown_check(none).passed
    table = replay_compare.html_table(replay_compare.compare(df.assign(rec_model="<b>"), {
        **plan, "recorded": {"<b>": plan["recorded"]["a"]}, "models": {"<b>": "<b>"}}))
    assert "&lt;b&gt;" in table and "<b>" not in table and "50 % faster" in table
    assert "the trace recorded none" in replay_compare.html_table(none)


def _replay(tmp_path, *args, timeout=150):
    out = tmp_path / "reports"
    proc = subprocess.run([sys.executable, "-m", "opskit", "loadtest", "replay", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout)
    runs = list(out.iterdir()) if out.exists() else []
    return proc, (runs[0] if runs else None)


@pytest.mark.slow
def test_call_log_replayed_against_the_mock_at_its_offsets(tmp_path):
    proc, run = _replay(tmp_path, "--trace", str(CALLLOG))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    schedule = {e["i"]: e for e in map(json.loads, (run / "replay" / "schedule.jsonl").read_text().splitlines())}
    rows = [json.loads(x) for p in (run / "log").glob("requests-replay-*.jsonl") for x in p.read_text().splitlines()]
    assert sorted(r["trace_index"] for r in rows) == list(range(len(schedule))) == list(range(32))
    tr = trace.read(CALLLOG)
    offsets = [r.t - tr.requests[0].t for r in tr.requests]
    assert [schedule[i]["at"] for i in range(32)] == pytest.approx(offsets, abs=1e-6)
    # sent when the trace says, in its order: each send within a generous second of its offset
    t0 = min(r["t_sent"] for r in rows)
    sent = {r["trace_index"]: r["t_sent"] - t0 for r in rows}
    assert all(abs(sent[i] - offsets[i]) < 1.0 for i in range(32)), sent
    late_order = [i for i in range(31) if offsets[i + 1] - offsets[i] > 0.2 and sent[i + 1] <= sent[i]]
    assert not late_order
    assert max(sent.values()) - min(sent.values()) == pytest.approx(offsets[-1], abs=1.0)
    # each request as recorded: model, stream flag, max_tokens (the mock stops there at most)
    by_index = {r["trace_index"]: r for r in rows}
    assert all(by_index[i]["model"] == schedule[i]["model"] == tr.requests[i].model for i in range(32))
    assert all(by_index[i]["streamed"] == tr.requests[i].stream for i in range(32))
    assert all(by_index[i]["output_tokens"] <= tr.requests[i].output_tokens for i in range(32) if tr.requests[i].ok)
    summary = json.loads((run / "summary.json").read_text())["scenarios"]["replay"]
    assert summary["input_tokens"] == sum(r.input_tokens for r in tr.requests)  # the mock counts 4 chars a token
    assert summary["cached_input_tokens"] > 0  # the shared prefixes reached the mock's context cache again
    section = summary["replay"]
    assert set(section["by_model"]) == {"deepseek-chat", "deepseek-reasoner"}
    assert all(row["ratio"]["duration_p50_s"] is not None for row in section["by_model"].values())
    assert "recorded -> replayed:" in proc.stdout and ("faster" in proc.stdout or "slower" in proc.stdout)
    page = (run / "report.html").read_text()
    assert "replayed vs recorded latency, per model" in page and page.count("rowspan='4'") == 2
    assert "achieved_rate_ratio" in proc.stdout and "VERDICT: PASS" in proc.stdout


@pytest.mark.slow
def test_mooncake_slice_replayed_fast_says_there_is_no_recorded_latency(tmp_path):
    proc, run = _replay(tmp_path, "--trace", str(MOONCAKE), "--window", "3..12", "--speed", "3",
                        "--max-requests", "12", "--no-proxy")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "cut: --window 3..12" in proc.stderr and "cut: --max-requests 12" in proc.stderr
    assert "recorded latency: none (the mooncake trace" in proc.stdout
    rows = [json.loads(x) for x in (run / "log" / "requests-replay-0.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["model"] == "deepseek-chat" for r in rows)


def test_a_long_trace_is_read_only_as_far_as_it_can_be_replayed(tmp_path):
    f = tmp_path / "day.jsonl"
    f.write_text("".join(json.dumps({"timestamp": k * 1000, "input_length": 10, "output_length": 5, "hash_ids": [k]})
                         + "\n" for k in range(5000)))  # one request a second for 83 minutes
    tr = trace.read(f, stop_after=120.0)
    assert len(tr.requests) == 122 and tr.stopped and "line 122" in tr.stopped
    plan = _plan(tr, max_duration=60.0)
    assert len(plan.entries) == 61 and plan.cuts == ["--max-duration 60 s: replayed the first 61 of 122 requests "
                                                     "(121 s of arrivals at speed 1)"]


def test_models_sent_as_recorded_when_served_else_the_fallback():
    from opskit.loadtest.replay_cli import _model_mapper

    served = _model_mapper(None, ("a", "b"), "a")
    assert [served(m) for m in ("a", "b", "c", None)] == ["a", "b", "a", "a"]
    unknown = _model_mapper(None, None, "a")  # a bare --target URL: its models are not known
    assert [unknown(m) for m in ("b", None)] == ["b", "a"]
    assert _model_mapper("z", ("a",), "a")("a") == "z"


@pytest.mark.slow
def test_a_slower_build_fails_against_the_recorded_latency(tmp_path):
    # the same traffic against a target 1.5 s slower to its first token: every call is slower than recorded
    proc, run = _replay(tmp_path, "--trace", str(CALLLOG), "--window", "..4", "--max-slowdown", "0.1",
                        "--mock-args", "--extra-ttft-ms 1500", "--no-proxy")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert "replay    vs_recorded_p95" in proc.stdout and "slower than recorded" in proc.stdout
    verdict = next(line for line in proc.stdout.splitlines() if line.startswith("VERDICT"))
    assert verdict.startswith("VERDICT: FAIL") and "replay vs_recorded_p95" in verdict
    assert json.loads((run / "summary.json").read_text())["passed"] is False


def test_azure_2024_timestamps_with_an_offset(tmp_path):
    # the 2024 week-long traces write microseconds and a UTC offset
    f = tmp_path / "AzureLLMInferenceTrace_code_1week.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00.009930+00:00,2048,28\n"
                 "2024-05-10 00:00:01+00:00,1024,4\n2024-05-10 02:00:01.5+02:00,64,8\n")
    tr = trace.read(f)
    assert [round(r.t - tr.requests[0].t, 6) for r in tr.requests] == [0.0, 0.99007, 1.49007]
