"""A replay's report section: replayed latency beside the recorded one, per model. Pure computation.

The recorded side is the trace's own successful calls among those replayed (opskit's call log records
duration and TTFT; the Mooncake and Azure traces record no latency, and the section says so). The
replayed side is this run's successful calls, grouped by the model the trace recorded (a call sent to
a mapped model still counts under its recorded one). `faster`/`slower` is replayed over recorded.
"""

from __future__ import annotations

import pandas as pd

from opskit.loadtest.slo import Check

METRICS = (("duration_p50_s", "duration p50"), ("duration_p95_s", "duration p95"),
           ("ttft_p50_s", "TTFT p50"), ("ttft_p95_s", "TTFT p95"))
SKIPPED_SHOWN = 20


def _q(s: pd.Series, q: float) -> float | None:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.quantile(q)) if len(s) else None


def replayed_by_model(df: pd.DataFrame) -> dict[str, dict]:
    """This run's latency per recorded model (successful calls; TTFT of streamed ones)."""
    out: dict[str, dict] = {}
    if not len(df) or "rec_model" not in df:
        return out
    for model, g in df.groupby(df["rec_model"].fillna("").astype(str)):
        ok = g[g["ok"]]
        streamed = ok[ok["streamed"].fillna(False).astype(bool)]
        out[model] = {"requests": int(len(g)), "ok": int(len(ok)),
                      "duration_p50_s": _q(ok["duration_s"], 0.5), "duration_p95_s": _q(ok["duration_s"], 0.95),
                      "ttft_p50_s": _q(streamed["ttft_s"], 0.5), "ttft_p95_s": _q(streamed["ttft_s"], 0.95),
                      "output_tokens_mean": float(ok["output_tokens"].mean()) if len(ok) else None}
    return out


def compare(df: pd.DataFrame, plan: dict) -> dict:
    """The comparison section for summary.json: `plan` is the replay's plan.json."""
    recorded, replayed = plan.get("recorded") or {}, replayed_by_model(df)
    rows = {}
    for model in sorted(set(recorded) | set(replayed)):
        rec, rep = recorded.get(model, {}), replayed.get(model, {})
        change = {k: (rep[k] / rec[k]) if rec.get(k) and rep.get(k) is not None else None for k, _ in METRICS}
        rows[model] = {"sent_as": (plan.get("models") or {}).get(model, model), "recorded": rec, "replayed": rep,
                       "ratio": change}
    return {"format": plan["trace"]["format"], "has_latency": plan["trace"]["has_latency"], "by_model": rows,
            "cuts": plan.get("cuts", []), "skipped_count": plan["trace"]["skipped_count"],
            "skipped": plan["trace"]["skipped"][:SKIPPED_SHOWN], "lines": plan["trace"]["lines"],
            "speed": plan["speed"], "max_slowdown": plan.get("max_slowdown")}


def change_words(ratio: float | None) -> str:
    """`12 % slower`, `30 % faster`, `same` from replayed / recorded."""
    if ratio is None:
        return "-"
    if abs(ratio - 1) < 0.005:
        return "same"
    return f"{abs(ratio - 1) * 100:.0f} % {'slower' if ratio > 1 else 'faster'}"


def slowdown_check(c: dict) -> Check | None:
    """With --max-slowdown: the worst replayed/recorded p95 duration over the models must stay within it."""
    limit = c.get("max_slowdown")
    if limit is None:
        return None
    if not c["has_latency"]:
        return Check("replay", "vs_recorded_p95", None, "<=", 1 + limit, False,
                     f"the {c['format']} trace records no latency to compare with")
    worst, which = None, ""
    for model, row in c["by_model"].items():
        r = row["ratio"].get("duration_p95_s")
        if r is not None and (worst is None or r > worst):
            worst, which = r, model or "(no model)"
    note = f"{which}: duration p95 {change_words(worst)} than recorded" if worst is not None else ""
    return Check("replay", "vs_recorded_p95", worst, "<=", 1 + limit, worst is not None and worst <= 1 + limit,
                 note or "no model with recorded and replayed successes")


def _article(fmt: str) -> str:
    return f"{'an' if fmt[:1] in 'aeiou' else 'a'} {fmt}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def head_lines(c: dict) -> list[str]:
    """What was replayed: the trace, its malformed lines, every cut, and whether it recorded latency."""
    out = [f"replay of {_article(c['format'])} trace at speed {c['speed']:g}: {c['lines']} lines read, "
           f"{c['skipped_count']} malformed and skipped"
           + (" (lines " + ", ".join(f"{s or ''}{':' if s else ''}{n}" for s, n, _ in c["skipped"])
              + (", ..." if c["skipped_count"] > len(c["skipped"]) else "") + ")" if c["skipped"] else "")]
    out += [f"cut: {cut}" for cut in c["cuts"]]
    if not c["has_latency"]:
        out.append(f"recorded latency: none (the {c['format']} trace records arrival times and lengths only), "
                   "so there is nothing to compare the replayed latency with")
    return out


def lines(c: dict) -> list[str]:
    """The section as text lines, printed after the verdict table."""
    out = head_lines(c)
    for model, row in c["by_model"].items():
        rec, rep = row["recorded"], row["replayed"]
        name = model or "(no model in the trace)"
        sent = f" (sent as {row['sent_as']})" if row["sent_as"] != model else ""
        head = f"model {name}{sent}: {rep.get('ok', 0)}/{rep.get('requests', 0)} replayed ok"
        if not c["has_latency"]:
            out.append(f"{head}; replayed duration p50/p95 {_ms(rep.get('duration_p50_s'))}/"
                       f"{_ms(rep.get('duration_p95_s'))} ms, TTFT p50/p95 {_ms(rep.get('ttft_p50_s'))}/"
                       f"{_ms(rep.get('ttft_p95_s'))} ms")
            continue
        out.append(f"{head}, {rec.get('ok', 0)} recorded ok; recorded -> replayed:")
        for key, label in METRICS:
            out.append(f"  {label:<13} {_ms(rec.get(key)):>7} -> {_ms(rep.get(key)):>7} ms  "
                       f"{change_words(row['ratio'].get(key))}")
        ro, po = rec.get("output_tokens_mean"), rep.get("output_tokens_mean")
        if ro is not None and po is not None:
            out.append(f"  output tokens mean {ro:.0f} -> {po:.0f}" + ("  (the target generated fewer than "
                       "recorded: durations are not like for like; --ignore-eos on vLLM/SGLang)" if po < 0.9 * ro else ""))
    return out


def html_table(c: dict) -> str:
    """The comparison as an HTML table: per recorded model, recorded and replayed p50/p95 and the change."""
    from html import escape as e

    if not c["has_latency"]:
        head = "<tr><th>model</th><th>replayed ok</th>" + "".join(f"<th>{e(lbl)} ms</th>" for _, lbl in METRICS)
        body = "".join(f"<tr><td>{e(m or '(none)')}{e(' as ' + r['sent_as'] if r['sent_as'] != m else '')}</td>"
                       f"<td>{r['replayed'].get('ok', 0)}/{r['replayed'].get('requests', 0)}</td>"
                       + "".join(f"<td>{_ms(r['replayed'].get(k))}</td>" for k, _ in METRICS) + "</tr>"
                       for m, r in c["by_model"].items())
        return f"<h3>replayed latency (the trace recorded none)</h3><div class='wide'><table>{head}</tr>{body}</table></div>"
    head = ("<tr><th>model</th><th>metric</th><th>recorded ms</th><th>replayed ms</th><th>change</th></tr>")
    body = []
    for m, r in c["by_model"].items():
        name = e(m or "(none)") + (e(f" (sent as {r['sent_as']})") if r["sent_as"] != m else "")
        counts = f"{r['recorded'].get('ok', 0)} recorded ok, {r['replayed'].get('ok', 0)} replayed ok"
        for j, (k, label) in enumerate(METRICS):
            ratio = r["ratio"].get(k)
            cls = "" if ratio is None else (" class='fail'" if ratio > 1.005 else " class='pass'")
            first = f"<td rowspan='{len(METRICS)}'>{name}<br>{e(counts)}</td>" if j == 0 else ""
            body.append(f"<tr>{first}<td>{e(label)}</td><td>{_ms(r['recorded'].get(k))}</td>"
                        f"<td>{_ms(r['replayed'].get(k))}</td><td{cls}>{e(change_words(ratio))}</td></tr>")
    return (f"<h3>replayed vs recorded latency, per model (same traffic, this build)</h3><div class='wide'><table>"
            f"{head}{''.join(body)}</table></div>")
