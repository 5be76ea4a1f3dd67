"""Verdicts as text (the table `opskit loadtest` prints) and as a self-contained HTML page.

`render(verdict)` is pure string building. `html(...)` puts the verdict first, then the key numbers
per scenario, then the plots from `plots` embedded as base64 PNG data URIs (no CDN, no external file),
so report.html can be mailed or attached to a release ticket as it is.
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


def key_numbers(summary: dict) -> list[tuple[str, str]]:
    """(label, value) pairs shown under each scenario's heading."""
    s = summary
    rows = [("requests (ok)", f"{s['requests']} ({s['ok']})"), ("throughput", f"{s['throughput_rps']:.2f} req/s"),
            ("output tokens/s (aggregate)", f"{s['output_tokens_s']:.1f}"),
            ("errors", (", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none")
             + ("  (429s are expected here: see the 429 share)" if s.get("throttling") else ""))]
    timings = (("ttft_s", "TTFT"), ("ttfot_s", "TTFOT"), ("duration_s", "duration"), ("itl_s", "ITL"),
               ("tpot_s", "TPOT"))
    if s.get("streamed_ratio") == 0:  # --no-stream: a duration per call, no TTFT/ITL/TPOT (DESIGN.md)
        timings = (("duration_s", "duration"),)
        rows.append(("timings", "not streamed: request duration only (no TTFT, ITL or TPOT)"))
    for key, label in timings:
        q = s[key]
        if key == "ttfot_s" and q == s["ttft_s"]:  # no reasoning tokens: TTFOT would repeat TTFT
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
                     + ("  (overloaded: its timings are inflated by this much)" if lag["p99"] > 0.005 else "")))
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


def verdict_paragraph(verdict: Verdict) -> str:
    """One paragraph for the top of the page, to forward as it is."""
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


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        ".wide{overflow-x:auto}p.verdict{font-size:1.15em;max-width:60em}"
        "@media (max-width:700px){body{margin:.6em}td,th{padding:2px 4px;font-size:.9em}"
        ".plot img{max-width:none;width:1000px}}"  # six panels shrunk to a phone's width are unreadable: scroll
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.pass{color:#070}.fail{color:#b00;"
        "font-weight:bold}img{max-width:100%}h1 .fail,h1 .pass{font-size:1em}")


def html(verdict: Verdict, plots: dict[str, list[tuple[str, str]]], title: str = "opskit load test",
         meta: dict | None = None, params: dict[str, dict] | None = None) -> str:
    """The whole page. `plots`: scenario -> [(caption, base64 PNG)]; `params`: scenario -> what was asked."""
    e = _html.escape
    word = "PASS" if verdict.passed else "FAIL"
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           "<meta name='viewport' content='width=device-width,initial-scale=1'>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>{e(title)}: <span class='{word.lower()}'>{word}</span></h1>"]
    out.append(f"<p class='verdict'>{e(verdict_paragraph(verdict))}</p>")
    if meta:
        out.append("<p>" + e(", ".join(f"{k}: {v}" for k, v in meta.items())) + "</p>")
    out.append("<h2>Verdict</h2><div class='wide'><table><tr><th>scenario</th><th>check</th><th>value</th><th>limit</th>"
               "<th>result</th><th>note</th></tr>")
    for c in verdict.checks:
        cls = "pass" if c.passed else "fail"
        out.append(f"<tr><td>{e(c.scenario)}</td><td>{e(c.name)}</td><td>{e(fmt_value(c.name, c.value))}</td>"
                   f"<td>{e(_limit(c))}</td><td class='{cls}'>{cls.upper()}</td><td>{e(c.note)}</td></tr>")
    out.append("</table></div>")
    for name, summary in verdict.summaries.items():
        out.append(f"<h2>{e(name)}</h2><div class='wide'><table>")
        asked = (params or {}).get(name)
        if asked:
            out.append(f"<tr><th>asked</th><td>{e(_asked(asked))}</td></tr>")
        out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in key_numbers(summary)]
        out.append("</table></div>")
        if summary.get("replay"):
            from opskit.loadtest.replay_compare import html_table

            out.append(html_table(summary["replay"]))
        for caption, b64 in plots.get(name, []):
            out.append(f"<h3>{e(caption)}</h3><div class='wide plot'><img alt='{e(caption)}' "
                       f"src='data:image/png;base64,{b64}'></div>")
    out.append("</body></html>")
    return "\n".join(out)
