"""Verdicts as text (the table `opskit loadtest` prints) and as a self-contained HTML page.

`render(verdict)` is pure string building. `html(...)` puts a one-paragraph verdict first, then every
check, then per scenario what was asked, its key numbers and its charts from `plots`, each an inline
SVG that answers one question (no CDN, no script, no file beside it), so report.html can be mailed or
attached to a release ticket as it is. The page is built from one function per block
(`checks_table`, `scenario_section`, `charts_html`); a new block is one more function whose HTML goes
into `html(..., sections=[...])`.
"""

from __future__ import annotations

import html as _html

from opskit.loadtest.slo import Check, Verdict

_TIMES = ("ttft_p95", "duration_p90")
_RATIOS = ("error_ratio", "achieved_rate_ratio", "circuit_breaker")


def fmt_value(name: str, value: float | None) -> str:
    """A check's value in the unit people read: ms for times, % for ratios, plain counts."""
    if value is None:
        return "-"
    if name in _TIMES:
        return f"{value * 1000:.1f} ms"
    if name in _RATIOS:
        return f"{value * 100:.2f} %"
    if name == "vs_recorded_p95":  # replayed over recorded
        return f"x{value:.2f}"
    return f"{value:g}"


def _limit(c: Check) -> str:
    return f"{c.op} {fmt_value(c.name, c.limit)}" if c.limit is not None else "-"


def render(verdict: Verdict) -> str:
    """The verdict table, then one line naming every missed objective."""
    rows = [("SCENARIO", "CHECK", "VALUE", "LIMIT", "RESULT", "NOTE")]
    for c in verdict.checks:
        rows.append((c.scenario, c.name, fmt_value(c.name, c.value), _limit(c), "pass" if c.passed else "FAIL",
                     c.note))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(5)) + ("  " + r[5] if r[5] else "") for r in rows]
    if verdict.passed:
        lines.append(f"VERDICT: PASS ({len(verdict.checks)} checks)")
    else:
        missed = ", ".join(f"{c.scenario} {c.name}" for c in verdict.missed) or "no checks ran"
        stopped = "".join(f"[{c.scenario}] {c.note}; " for c in verdict.missed if c.name == "circuit_breaker")
        lines.append(f"VERDICT: FAIL ({stopped}missed: {missed})")
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


def error_rows(s: dict) -> list[tuple[str, str]]:
    """Errors in words. In the throttling scenario 429s are the answer it provokes, not errors: they
    get their own row ("429s: 20 expected (throttling)") and "errors" counts everything else."""
    listed = ", ".join(f"{k}: {v}" for k, v in s["errors"].items())
    if not s.get("throttling"):
        return [("errors", f"{listed} ({100 * s['error_ratio']:.1f} % of calls)" if listed else "none")]
    t = s["throttling"]
    return [("429s", f"{t['rate_limited']} expected (throttling: the load goes above the limit on purpose)"
                     if t["rate_limited"] else "none: the target never throttled (the scenario expects it to)"),
            ("errors besides 429s", f"{listed} ({100 * s['error_ratio']:.1f} % of the rest)" if listed else "none")]


def key_numbers(summary: dict) -> list[tuple[str, str]]:
    """(label, value) pairs shown under each scenario's heading."""
    s = summary
    rows = [("requests (ok)", f"{s['requests']} ({s['ok']})"), ("throughput", f"{s['throughput_rps']:.2f} req/s"),
            ("output tokens/s (aggregate)", f"{s['output_tokens_s']:.1f}"), *error_rows(s)]
    timings = (("ttft_s", "TTFT"), ("ttfot_s", "TTFOT"), ("duration_s", "duration"), ("itl_s", "ITL"),
               ("tpot_s", "TPOT"))
    if s.get("streamed_ratio") == 0:  # --no-stream: a duration per call, no TTFT/ITL/TPOT (DESIGN.md)
        timings = (("duration_s", "duration"),)
        rows.append(("timings", "not streamed: request duration only (no TTFT, ITL or TPOT)"))
    for key, label in timings:
        q = s[key]
        if key == "ttfot_s" and not s.get("reasoning_tokens"):  # no reasoning: TTFOT is TTFT again
            continue
        rows.append((f"{label} p50/p95/p99 ms", f"{_ms(q['p50'])} / {_ms(q['p95'])} / {_ms(q['p99'])}"))
    if s.get("input_tokens") or s.get("output_tokens"):
        rows.append(("tokens by type", f"input {s['input_tokens']} (cached {s.get('cached_input_tokens') or 0}), "
                                       f"output {s['output_tokens']} (reasoning {s.get('reasoning_tokens') or 0})"))
    if s.get("cost"):
        c = s["cost"]
        parts = ", ".join(f"{m or '?'} {v:.4f}" for m, v in sorted(c["by_model"].items()))
        rows.append(("estimated cost", f"{c['total']:.4f} {c['currency']}" + (f" ({parts})" if parts else "")
                     + (f"; {c['unpriced_calls']} calls of unpriced models" if c["unpriced_calls"] else "")))
    if s.get("tokens_from_usage_ratio") is not None and s["tokens_from_usage_ratio"] < 1:
        rows.append(("tokens", f"counted from text chunks for {100 * (1 - s['tokens_from_usage_ratio']):.0f} % "
                               "of requests (no usage from the server)"))
    if s.get("requested_rate"):
        rows.append(("rate achieved / requested", f"{s['achieved_rate']:.2f} / {s['requested_rate']:.2f} req/s"))
        rows.append(("send lag p99 ms", _ms(s["send_lag_s"]["p99"])))
    if s.get("throttling"):
        t = s["throttling"]
        rows += [("accepted (max per window)", f"{t['accepted']} ({t['max_accepted_in_window']}, limit "
                                              f"{t['limit_requests']}/{t['window_s']:g}s)"),
                 ("429 share", f"{100 * t['rate_limited_ratio']:.1f} %"),
                 ("recovery p50/max s", f"{t['recover_s']['p50'] or 0:.2f} / {t['recover_s']['max'] or 0:.2f} "
                                        f"({t['recovered']} recovered)"),
                 ("goodput tokens/s", f"{t['goodput_tokens_s']:.1f}")]
    if s.get("client_lag_s"):
        lag = s["client_lag_s"]
        rows.append(("load generator's own loop lag p50/p99/max ms",
                     f"{_ms(lag['p50'])} / {_ms(lag['p99'])} / {_ms(lag['max'])}"
                     + ("  (overloaded: sends may leave up to this much late; reads carry the kernel's receive time)" if lag["p99"] > 0.005 else "")))
    if s.get("by_turn"):
        rows.append(("input tokens by turn", ", ".join(f"{k}: {v['input_tokens_mean']:.0f}"
                                                       for k, v in s["by_turn"].items())))
        rows.append(("cache hit ratio by turn", ", ".join(f"{k}: {_pct(v.get('cache_hit_ratio'))}"
                                                          for k, v in s["by_turn"].items())))
    if s.get("engine") and s["engine"].get("engine"):
        g = s["engine"]
        rows.append((f"server side ({g['engine']} /metrics, {g['samples']} samples)",
                     f"TTFT mean {_ms(g['server_ttft_mean_s'])} ms (client TTFT p50 {_ms(s['ttft_s']['p50'])} ms), "
                     f"queue time mean {_ms(g['queue_time_mean_s'])} ms, peak waiting {g['max_waiting']:g}, "
                     f"peak running {g['max_running']:g}, peak KV usage "
                     f"{'-' if g['max_kv_usage'] is None else format(g['max_kv_usage'], '.0%')}, "
                     f"preemptions {'-' if g['preemptions'] is None else format(g['preemptions'], 'g')}"))
    elif s.get("engine"):
        rows.append(("server side", f"no sample from {s['engine']['url']} (see the notes)"))
    if s.get("replay"):  # the trace and its cuts; the comparison table follows the key numbers
        from opskit.loadtest.replay_compare import head_lines

        rows += [("replay" if i == 0 else "", line) for i, line in enumerate(head_lines(s["replay"]))]
    if s.get("ground_truth"):
        g = s["ground_truth"]
        rows.append(("vs mock ground truth", f"TTFT |err| p99 {_ms(g['ttft_abs_err_p99_s'])} ms, "
                                             f"token mismatches {g['output_tokens_mismatch']}"))
    return rows


def headline(name: str, s: dict) -> str:
    """A scenario in one clause: calls, rate, the judged latencies and its errors in words."""
    parts = [f"{s['requests']} calls at {s['throughput_rps']:.1f} req/s"]
    if s.get("ttft_s", {}).get("p95") is not None:
        parts.append(f"TTFT p95 {_ms(s['ttft_s']['p95'])} ms")
    if s.get("duration_s", {}).get("p90") is not None:
        parts.append(f"duration p90 {_ms(s['duration_s']['p90'])} ms")
    if s.get("throttling"):
        parts.append(f"{s['throttling']['rate_limited']} expected 429s")
    errors = sum(s.get("errors", {}).values())
    parts.append(f"{errors} errors ({100 * s['error_ratio']:.1f} %)" if errors else "no errors")
    return f"{name}: " + ", ".join(parts)


def verdict_paragraph(verdict: Verdict) -> str:
    """One paragraph for the top of the page, to forward as it is: the verdict, what stopped or
    missed, then each scenario in one clause."""
    return (_verdict_sentence(verdict) + " " + "; ".join(headline(n, s) for n, s in verdict.summaries.items())
            + ("." if verdict.summaries else "")).strip()


def _verdict_sentence(verdict: Verdict) -> str:
    scenarios = ", ".join(verdict.summaries) or "no scenario"
    if verdict.passed:
        return f"PASS: all {len(verdict.checks)} checks met ({scenarios})."
    missed = "; ".join(f"{c.scenario} {c.name} {fmt_value(c.name, c.value)} (limit {_limit(c)})"
                       for c in verdict.missed if c.name != "circuit_breaker")
    stopped = " ".join(f"{c.scenario}: {c.note}." for c in verdict.missed if c.name == "circuit_breaker")
    return (f"FAIL: {len(verdict.missed)} of {len(verdict.checks)} checks missed ({scenarios}). "
            + (stopped + " " if stopped else "") + (f"Missed: {missed}." if missed else "")).strip()


def _asked(d: dict) -> str:
    """What was asked, in words (it read like a Python dump)."""
    parts = [f"{d['duration']:g} s" if "duration" in d else None,
             f"{d['users']} users" if d.get("scenario") not in ("qps", "replay") and "users" in d else None,
             f"{d['scheduled']} requests at the trace's arrival times, speed {d.get('speed', 1):g}, "
             f"{d.get('streamed')} streamed" if d.get("arrival") == "trace" else None,
             f"{d.get('arrival', 'fixed')} arrivals at {d['rate']:g} req/s" if d.get("rate") else None,
             f"{d['processes']} Locust process{'es' if d.get('processes', 1) > 1 else ''}" if "processes" in d else None,
             None if d.get("arrival") == "trace" else
             ("streamed (" + str(d.get("transport", "sse")) + ")") if d.get("stream") else "not streamed",
             f"model {d['model']}" if d.get("model") else None,
             f"limit {d['limit_requests']:g} per {d.get('window_s') or 60:g} s, offered x{d.get('overdrive', 1):g}"
             if d.get("limit_requests") else None,
             f"{d['turns']} turns, keeping {d.get('keep_turns')}" if d.get("turns") else None]
    return ", ".join(p for p in parts if p)


CSS = ("body{font-family:sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;line-height:1.35}"
        "table{border-collapse:collapse}.nowrap td{white-space:nowrap}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
        "vertical-align:top}.wide{overflow-x:auto}p.verdict{font-size:1.15em;max-width:60em}"
        ".pass{color:#070}.fail{color:#b00;font-weight:bold}h1 .fail,h1 .pass{font-size:1em}"
        ".charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,460px),1fr));gap:1em 2em}"
        "figure{margin:0}figcaption{font-weight:bold;font-size:1.05em;margin:.6em 0 .2em}svg.chart{width:100%;height:auto}"
        "@media (max-width:700px){body{margin:.6em auto;padding:0 .5em}h1{font-size:1.45em}"
        # a phone: every check a block of its own (scenario, check, value, limit, result, note wrap)
        "table.checks tr:first-child{display:none}table.checks tr{display:block;border-bottom:1px solid #ccc;"
        "padding:.3em 0}table.checks td{display:inline;border:none;padding:0 .4em 0 0}"
        "table.checks td:nth-child(2){font-weight:bold}table.checks td:nth-child(6){display:block}"
        "table.numbers th,table.numbers td{display:block;border:none;padding:0}"
        "table.stack tr:first-child{display:none}table.stack tr{display:block;border-bottom:1px solid #ccc;"
        "padding:.3em 0}table.stack td{display:block;border:none;padding:0}"
        "table.stack td::before{content:attr(data-label) ': ';color:#555}"
        "table.numbers td{padding-bottom:.4em}}")


def _head(title: str, word: str) -> list[str]:
    e = _html.escape
    return [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
            "<meta name='viewport' content='width=device-width,initial-scale=1'>",
            f"<style>{CSS}</style></head><body>",
            f"<h1>{e(title)}: <span class='{word.lower()}'>{word}</span></h1>"]


def checks_table(verdict: Verdict) -> str:
    """Every check, one row each (on a phone one block each)."""
    e = _html.escape
    out = ["<h2>Checks</h2><table class='checks'><tr><th>scenario</th><th>check</th><th>value</th>"
           "<th>limit</th><th>result</th><th>note</th></tr>"]
    for c in verdict.checks:
        cls = "pass" if c.passed else "fail"
        out.append(f"<tr><td>{e(c.scenario)}</td><td>{e(c.name)}</td><td>{e(fmt_value(c.name, c.value))}</td>"
                   f"<td>{e(_limit(c))}</td><td class='{cls}'>{cls.upper()}</td><td>{e(c.note)}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def charts_html(charts) -> str:
    """Charts (objects with `question` and inline `svg`) in a grid: two abreast on a laptop, one on a phone."""
    if not charts:
        return ""
    figs = "".join(f"<figure><figcaption>{_html.escape(c.question)}</figcaption>{c.svg}</figure>" for c in charts)
    return f"<div class='charts'>{figs}</div>"


def scenario_section(name: str, summary: dict, charts, asked: dict | None = None) -> str:
    """A scenario's heading, what was asked, its key numbers and its charts."""
    e = _html.escape
    out = [f"<h2>{e(name)}</h2><table class='numbers'>"]
    if asked:
        out.append(f"<tr><th>asked</th><td>{e(_asked(asked))}</td></tr>")
    out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in key_numbers(summary)]
    out.append("</table>")
    if summary.get("replay"):  # replayed latency beside the trace's recorded latency, per model
        from opskit.loadtest.replay_compare import html_table

        out.append(html_table(summary["replay"]))
    out.append(charts_html(charts))
    return "\n".join(out)


def html(verdict: Verdict, charts: dict[str, list] | None = None, title: str = "opskit load test",
         meta: dict | None = None, params: dict[str, dict] | None = None,
         sections: list[str] | None = None) -> str:
    """The whole page: verdict paragraph, checks, then per scenario its numbers and charts.

    `charts`: scenario -> [Chart] (`plots`); `params`: scenario -> what was asked; `sections`: more
    HTML blocks (each with its own <h2>) placed after the scenarios, e.g. a comparison."""
    e = _html.escape
    word = "PASS" if verdict.passed else "FAIL"
    out = _head(title, word)
    out.append(f"<p class='verdict'>{e(verdict_paragraph(verdict))}</p>")
    if meta:
        out.append("<p>" + e(", ".join(f"{k}: {v}" for k, v in meta.items())) + "</p>")
    out.append(checks_table(verdict))
    for name, summary in verdict.summaries.items():
        out.append(scenario_section(name, summary, (charts or {}).get(name, []), (params or {}).get(name)))
    out += sections or []
    out.append("</body></html>")
    return "\n".join(out)


def add_section(page_path, section: str) -> None:
    """Append a block to a report already written (e.g. the comparison with --baseline, known only
    after the run): it goes last, before the page ends."""
    from pathlib import Path

    path = Path(page_path)
    page = path.read_text()
    end = page.rindex("</body>")
    path.write_text(page[:end] + section + "\n" + page[end:])
