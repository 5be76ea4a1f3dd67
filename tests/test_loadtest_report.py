"""The load-test and capacity reports: one question per chart, SLO lines on latency charts, TTFOT for
reasoning models only, 429s in the throttling scenario as what they are, one self-contained page."""

from __future__ import annotations

import re
import warnings

import pytest

from opskit.loadtest import capacity_report, plots, report, results, slo
from tests.test_loadtest_units import row

DASHED_SLO = re.compile(r"stroke-dasharray: [0-9.,]+; stroke-dashoffset: 0; stroke: #c00000")




def page_for(rows, meta: dict, limits: dict[str, float] | None = None) -> tuple[str, dict]:
    """The report page of one scenario's rows, as `opskit loadtest` builds it."""
    df = results.frame(rows)
    v = slo.evaluate(df, slo.defaults(), meta)
    name = meta["scenario"]
    lines = {c.name: c.limit for c in v.checks if c.name in ("ttft_p95", "duration_p90") and c.limit is not None}
    charts = plots.all_figures(df, {name: limits if limits is not None else lines}, v.summaries)
    return report.html(v, charts, params={name: meta}), v.summaries[name]


def svg_of(page: str, question: str) -> str:
    """The SVG under one caption (each chart is a <figure> with its question as caption)."""
    start = page.index(f"<figcaption>{question}</figcaption>")
    return page[start:page.index("</figure>", start)]


def test_one_question_per_chart_with_slo_lines():
    rows = [row(t=i * 0.1, dur=0.8 + (i % 7) * 0.01, ttft=0.05 + (i % 5) * 0.01) for i in range(60)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matplotlib warning would land in the user's terminal
        page, _ = page_for(rows, {"scenario": "streaming", "duration": 6.0})
    questions = re.findall(r"<figcaption>([^<]+)</figcaption>", page)
    assert questions == ["Is time to first token within its SLO over time?",
                         "Is request duration within its SLO over time?",
                         "Where does the latency distribution sit against the SLOs?",
                         "How many requests per second completed?",
                         "How many output tokens per second came back?",
                         "How steady is the token stream (inter-token latency)?"]  # no error: no error chart
    assert page.count("<svg") == len(questions) == page.count("<figure>")
    # each latency chart carries its objective as a dashed line labelled with the limit
    ttft = svg_of(page, questions[0])
    assert ">SLO TTFT p95 &lt; 500 ms<" in ttft and DASHED_SLO.search(ttft)
    assert "SLO duration" not in ttft
    duration = svg_of(page, questions[1])
    assert ">SLO duration p90 &lt; 2000 ms<" in duration and DASHED_SLO.search(duration)
    spread = svg_of(page, questions[2])
    assert ">SLO TTFT p95 &lt; 500 ms<" in spread and ">SLO duration p90 &lt; 2000 ms<" in spread
    # TTFT sits ~7x under its objective, duration ~2x: a log axis keeps both the data's shape and the line on it
    assert ">ms (log scale)<" in ttft and ">ms (log scale)<" not in duration
    # charts share one page: no two of them may define the same id (clip paths, markers)
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert ids and len(ids) == len(set(ids))
    assert "<img" not in page and "http" not in page and "<script" not in page


def test_a_missed_slo_is_drawn_under_the_data_and_an_unjudged_scenario_asks_no_slo_question():
    rows = [row(t=i * 0.1, ttft=0.8) for i in range(30)]
    page, _ = page_for(rows, {"scenario": "streaming", "duration": 3.0})
    ttft = svg_of(page, "Is time to first token within its SLO over time?")
    assert ">SLO TTFT p95 &lt; 500 ms<" in ttft and ">ms<" in ttft  # linear: 800 ms beside a 500 ms line
    page, _ = page_for(rows, {"scenario": "streaming", "duration": 3.0}, limits={})
    assert "within its SLO" not in page and "How did time to first token move over the run?" in page
    assert "SLO TTFT" not in page


def test_ttfot_only_for_reasoning_models():
    plain = [row(t=i * 0.1) for i in range(30)]
    page, s = page_for(plain, {"scenario": "streaming", "duration": 3.0})
    assert "TTFOT" not in page and not s["reasoning_tokens"]
    # a reasoning model: the answer's first token comes after the reasoning, so TTFOT says something new
    thinking = [row(t=i * 0.1, ttft=0.1, ttfot_s=0.3, reasoning_tokens=5) for i in range(30)]
    page, s = page_for(thinking, {"scenario": "streaming", "duration": 3.0})
    assert "<th>TTFOT p50/p95/p99 ms</th><td>300.0 / 300.0 / 300.0</td>" in page
    assert ">TTFOT p95 (answer after reasoning)<" in svg_of(page, "Is time to first token within its SLO over time?")


def test_throttling_names_its_429s_as_expected_not_as_errors():
    rows = [row("throttling", t=i * 0.1, status=200) for i in range(10)]
    rows += [row("throttling", t=1.0 + i * 0.1, status=429, err="rate_limited", retry_after="4") for i in range(6)]
    meta = {"scenario": "throttling", "duration": 5.0, "window_s": 5.0, "limit_requests": 8}
    page, s = page_for(rows, meta)
    assert s["errors"] == {} and s["throttling"]["rate_limited"] == 6
    numbers = dict(report.key_numbers(s))
    assert numbers["429s"].startswith("6 expected (throttling")
    assert numbers["errors besides 429s"] == "none" and "errors" not in numbers
    assert "<th>errors</th><td>none</td>" not in page
    chart = svg_of(page, "When did the target throttle (429s expected here), and did anything else fail?")
    assert ">429 rate limited (expected): 6<" in chart
    assert ">limit 8 per 5 s = 1.6 req/s<" in svg_of(page, "How much did the target accept against its rate limit?")
    assert "6 expected 429s, no errors" in report.verdict_paragraph(slo.evaluate(results.frame(rows),
                                                                                 slo.defaults(), meta))
    # elsewhere a 429 is an error like any other, counted and drawn as one
    rows = [row("qps", t=i * 0.1) for i in range(10)] + [row("qps", t=1.0, status=429, err="rate_limited")]
    page, s = page_for(rows, {"scenario": "qps", "duration": 2.0, "requested_rate": 5.0})
    assert dict(report.key_numbers(s))["errors"] == "rate_limited: 1 (9.1 % of calls)"
    assert ">429 rate limited: 1<" in svg_of(page, "Which errors, and when?")
    assert ">asked 5 req/s<" in svg_of(page, "Did throughput keep up with the asked 5 req/s?")


def test_asked_reads_as_words():
    asked = {"scenario": "throttling", "duration": 20.0, "users": 8, "processes": 2, "stream": True,
             "transport": "sse", "model": "deepseek-chat", "limit_requests": 20.0, "window_s": 5.0, "overdrive": 2.0}
    assert report._asked(asked) == ("20 s, 8 users, 2 Locust processes, streamed (sse), model deepseek-chat, "
                                    "limit 20 per 5 s, offered x2")


def test_capacity_report_uses_the_same_charts():
    level = {"load": 10.0, "requests": 100, "achieved_rps": 9.9, "goodput_rps": 9.8, "error_ratio": 0.01,
             "ttft_s": {"p50": 0.05, "p95": 0.08, "p99": 0.1}, "duration_s": {"p50": 0.5, "p95": 0.7, "p99": 0.9},
             "passed": True, "missed": [], "attainment": {}}
    summary = {"scenario": "qps", "by": "rate", "unit": "req/s", "sentence": "meets every SLO up to 20 req/s",
               "levels": [level, {**level, "load": 20.0, "achieved_rps": 19.5}], "max_load": 20.0,
               "objectives": {"ttft_p95_seconds": 0.5, "duration_p90_seconds": 2.0, "error_ratio": 0.02}}
    page = capacity_report.html(summary)
    questions = re.findall(r"<figcaption>([^<]+)</figcaption>", page)
    assert len(questions) == len(set(questions)) == page.count("<svg") == 3
    assert ">SLO TTFT p95 &lt; 500 ms<" in page and ">SLO errors &lt; 2 %<" in page
    assert "<img" not in page and "http" not in page


def test_a_run_without_streaming_asks_only_what_it_can_answer():
    rows = [row("qps", t=i * 0.1, streamed=False, ttft=None, ttfot_s=None, itl=None) for i in range(30)]
    page, _ = page_for(rows, {"scenario": "qps", "duration": 3.0, "requested_rate": 10.0})
    questions = re.findall(r"<figcaption>([^<]+)</figcaption>", page)
    # no TTFT, no token stream: duration against its SLO, the distribution, throughput, tokens/s
    assert questions == ["Is request duration within its SLO over time?",
                         "Where does the latency distribution sit against the SLOs?",
                         "Did throughput keep up with the asked 10 req/s?",
                         "How many output tokens per second came back?"]
    assert "SLO TTFT" not in page and ">SLO duration p90 &lt; 2000 ms<" in page


def test_a_baseline_comparison_is_a_section_of_the_report(tmp_path):
    from opskit.loadtest import compare

    base = {"scenarios": {"qps": {"ttft_s": {"p95": 0.100}, "throughput_rps": 20.0, "error_ratio": 0.0}}}
    new = {"scenarios": {"qps": {"ttft_s": {"p95": 0.150}, "throughput_rps": 21.0, "error_ratio": 0.0},
                         "streaming": {}}}
    table = compare.compare(base, new, 0.10)
    section = compare.html_section(table, compare.only_in_one(base, new), 0.10, "reports/base")
    assert "<p>reports/base: REGRESSION in qps ttft_p95; only in one run (not compared): streaming.</p>" in section
    chart = svg_of(section, "What got worse against the baseline?")
    assert ">tolerance 10 %<" in chart and ">qps ttft_p95<" in chart and ">qps throughput_rps<" in chart
    assert "<td data-label='result' class=fail>REGRESSED</td>" in section
    assert [compare.worse_by(r) for r in table.itertuples()] == pytest.approx([50.0, -5.0, 0.0])  # more req/s: better
    page = tmp_path / "report.html"
    page.write_text(report.html(slo.Verdict(), {}))
    report.add_section(page, section)
    text = page.read_text()
    assert text.index("<h2>Against the baseline</h2>") < text.index("</body>") and text.endswith("</html>")
