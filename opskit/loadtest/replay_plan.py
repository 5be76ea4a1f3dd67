"""From a parsed trace to the schedule a replay walks, and the synthetic prompts it sends. Pure code.

The schedule keeps the trace's arrival times: offsets from the first request of the chosen slice
(`--window START..END`, seconds from the trace's first request), divided by `--speed`. It is cut by
`--max-requests` and `--max-duration` (a day-long trace must not run for a day by accident), and every
cut is said in `Plan.cuts`.

Prompts are synthetic text of the recorded length, one 4-character word a token (prompts.py). A shared
prefix block's text is derived from its key alone (the call log's chained prefix hash, Mooncake's
hash id), so two requests that shared a prefix in production share it again, byte for byte, and a
server's prefix or context cache sees the same reuse. The rest of a prompt is text of its own.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from opskit.loadtest.trace import Trace, TraceRequest

_WORDS = tuple(a + b + c for a in "bcdfgklmnprst" for b in "aeiou" for c in "dgkmnprst")  # 585 3-letter words
DEFAULT_OUTPUT_TOKENS = 64   # a recorded call without an output length (a failed one) asks for this many


@dataclass
class Plan:
    """The requests to replay, in order, and what was cut from the trace on the way."""

    entries: list[dict] = field(default_factory=list)   # the schedule (see entry())
    cuts: list[str] = field(default_factory=list)       # every cut, in words
    span_s: float = 0.0                                  # the last arrival's offset (after --speed)
    models: dict[str, str] = field(default_factory=dict)  # recorded model -> the model sent


def parse_window(text: str | None) -> tuple[float, float]:
    """`START..END` in seconds (either side may be empty) -> (start, end); ValueError when malformed."""
    if not text:
        return 0.0, math.inf
    start, sep, end = text.partition("..")
    if not sep:
        raise ValueError("expected START..END in seconds from the trace start, e.g. 600..1200 or 3600..")
    lo = float(start) if start.strip() else 0.0
    hi = float(end) if end.strip() else math.inf
    if not (math.isfinite(lo) and lo >= 0 and hi > lo):
        raise ValueError("START must be >= 0 and END greater than START")
    return lo, hi


def entry(i: int, req: TraceRequest, at: float, model: str, stream: bool) -> dict:
    """One schedule line: what the replay user sends, and when (`at`, seconds from the replay's start)."""
    return {"i": i, "line": req.line, "src": req.source, "at": round(at, 6), "model": model,
            "rec_model": req.model or "", "stream": stream, "input": req.input_tokens,
            "output": req.output_tokens or DEFAULT_OUTPUT_TOKENS, "blocks": [list(b) for b in req.blocks],
            "rec_ok": req.ok, "rec_duration_s": req.duration_s, "rec_ttft_s": req.ttft_s}


def plan(trace: Trace, window: tuple[float, float], speed: float, max_requests: int | None,
         max_duration: float | None, model_for: Callable[[str | None], str], stream_default: bool,
         stream_override: bool | None = None) -> Plan:
    """The schedule for a trace: the window's requests, time-compressed by `speed`, capped."""
    out = Plan()
    t0 = trace.requests[0].t
    lo, hi = window
    picked = [r for r in trace.requests if lo <= r.t - t0 < hi]
    if not picked:
        last = trace.requests[-1].t - t0
        raise ValueError(f"--window {lo:g}..{hi:g} holds no request (the trace spans 0..{last:.3f} s)")
    if lo > 0 or hi < math.inf:
        out.cuts.append(f"--window {lo:g}..{'' if hi == math.inf else format(hi, 'g')}: {len(picked)} of "
                        f"{len(trace.requests)} requests")
    start = picked[0].t
    if max_duration is not None:
        keep = [r for r in picked if (r.t - start) / speed <= max_duration]
        if len(keep) < len(picked):
            out.cuts.append(f"--max-duration {max_duration:g} s: replayed the first {len(keep)} of {len(picked)} "
                            f"requests ({(picked[-1].t - start) / speed:.0f} s of arrivals at speed {speed:g})")
        picked = keep
    if max_requests is not None and len(picked) > max_requests:
        out.cuts.append(f"--max-requests {max_requests}: replayed the first {max_requests} of {len(picked)} requests")
        picked = picked[:max_requests]
    for i, r in enumerate(picked):
        model = model_for(r.model)
        out.models.setdefault(r.model or "", model)
        stream = stream_override if stream_override is not None else (r.stream if r.stream is not None
                                                                      else stream_default)
        out.entries.append(entry(i, r, (r.t - start) / speed, model, stream))
    out.span_s = out.entries[-1]["at"]
    return out


def peak_rate(entries: list[dict]) -> int:
    """The most requests the schedule starts within one second (a sliding 1 s window)."""
    times, best, lo = [e["at"] for e in entries], 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def write_schedule(path: Path, entries: list[dict]) -> None:
    """The schedule as JSONL (one entry a line), which every Locust process reads its share of."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for e in entries:
            fh.write(json.dumps(e, separators=(",", ":")) + "\n")


def read_schedule(path: str | Path, worker: int = 0, workers: int = 1) -> list[dict]:
    """This worker's share of the schedule: every `workers`-th entry, starting at `worker`."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for k, line in enumerate(fh):
            if k % workers == worker:
                out.append(json.loads(line))
    return out


def words(seed: str, n: int) -> str:
    """`n` words (about `n` tokens, 4 characters each with the space) drawn from a seed string: the same
    seed gives the same text in every process (random.Random hashes a str seed with SHA-512)."""
    rng = random.Random(seed)
    return " ".join(rng.choices(_WORDS, k=n)) if n > 0 else ""


class PromptBuilder:
    """Builds each entry's prompt; remembers block texts (bounded) since shared blocks recur."""

    def __init__(self, run_seed: int = 1, cache_blocks: int = 4096) -> None:
        self.run_seed = run_seed
        self._cache: dict[tuple[str, int], str] = {}
        self._limit = cache_blocks

    def block(self, key: str, tokens: int) -> str:
        """The text of one shared block: a function of its key (and length) only."""
        text = self._cache.get((key, tokens))
        if text is None:
            digest = hashlib.sha256(key.encode()).hexdigest()
            text = words(f"block:{digest}", tokens)
            if len(self._cache) >= self._limit:
                self._cache.clear()
            self._cache[(key, tokens)] = text
        return text

    def prompt(self, e: dict) -> str:
        """The whole prompt of entry `e`: its shared blocks, then text of its own up to the recorded length."""
        parts, used = [], 0
        for key, tokens in e["blocks"]:
            parts.append(self.block(str(key), int(tokens)))
            used += int(tokens)
        if e["input"] > used:  # unique to this request (its index and the run's seed)
            parts.append(words(f"tail:{self.run_seed}:{e['i']}", e["input"] - used))
        return " ".join(parts)


def recorded_by_model(entries: list[dict]) -> dict[str, dict]:
    """Recorded latency of the replayed requests' successful calls, per recorded model."""
    import pandas as pd

    df = pd.DataFrame(entries)
    out: dict[str, dict] = {}
    if df.empty or "rec_duration_s" not in df:
        return out
    for model, g in df.groupby("rec_model"):
        ok = g[g["rec_ok"].astype(bool) & g["rec_duration_s"].notna()]
        ttft = ok["rec_ttft_s"].dropna()
        out[str(model)] = {"requests": int(len(g)), "ok": int(len(ok)),
                           "duration_p50_s": _q(ok["rec_duration_s"], 0.5), "duration_p95_s": _q(ok["rec_duration_s"], 0.95),
                           "ttft_p50_s": _q(ttft, 0.5), "ttft_p95_s": _q(ttft, 0.95),
                           "output_tokens_mean": float((ok if len(ok) else g)["output"].mean())}
    return out


def _q(s, q: float) -> float | None:
    s = s.dropna().astype(float)
    return float(s.quantile(q)) if len(s) else None
