"""From opskit's per-request log to numbers, with pandas. Pure computation: no printing, no plots.

`frame(rows)` builds the DataFrame; `summarize(df, meta)` returns one plain dict per scenario (what
summary.json holds and what `slo.evaluate` and `compare` read). Percentiles are over requests; ITL
percentiles are over every inter-token gap of every successful stream. Times are seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from opskit.loadtest.log import FIELDS, read_rows

QUANTILES = (0.5, 0.9, 0.95, 0.99)


def frame(rows: list[dict]) -> pd.DataFrame:
    """The log as a DataFrame with derived columns: t (s since the scenario started), ok, tpot_s."""
    df = pd.DataFrame(rows)
    for col in FIELDS:
        if col not in df.columns:
            df[col] = None
    df["error_type"] = df["error_type"].fillna("").astype(str)
    df["status"] = pd.to_numeric(df["status"], errors="coerce").fillna(0).astype(int)
    for col in ("duration_s", "ttft_s", "ttfot_s", "t_sched", "t_sent", "t_end", "wall", "mock_ttft_ms",
                "mock_queue_ms", "mock_output_tokens", "input_tokens", "output_tokens", "cached_input_tokens",
                "reasoning_tokens", "text_chunks"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["ok"] = df["error_type"] == ""
    if len(df):
        start = df.groupby("scenario")["t_sched"].transform("min")
        df["t"] = df["t_sched"] - start
    else:
        df["t"] = pd.Series(dtype=float)
    df["lag_s"] = df["t_sent"] - df["t_sched"]
    out = df["output_tokens"]
    df["tpot_s"] = np.where(df["ok"] & (out >= 2) & df["ttft_s"].notna(),
                            (df["duration_s"] - df["ttft_s"]).clip(lower=0) / (out - 1).where(out >= 2), np.nan)
    gen = df["duration_s"] - df["ttft_s"]
    df["out_tok_s"] = np.where(df["ok"] & (out >= 2) & (gen > 0), (out - 1) / gen.where(gen > 0), np.nan)
    return df


def load(run_dir: str | Path) -> pd.DataFrame:
    """Read every request log under `<run_dir>/log`."""
    return frame(read_rows(Path(run_dir) / "log"))


def client_lag(run_dir: str | Path, scenario: str) -> dict | None:
    """The load generator's own event-loop lag in a scenario (worst Locust process), if recorded."""
    import json

    worst = None
    for path in Path(run_dir, "log").glob(f"lag-{scenario}-*.json"):
        try:
            lag = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if worst is None or lag.get("p99", 0) > worst.get("p99", 0):
            worst = lag
    return worst


def _q(series: pd.Series) -> dict[str, float | None]:
    s = series.dropna()
    if s.empty:
        return {f"p{int(q * 100)}": None for q in QUANTILES} | {"mean": None, "max": None}
    vals = s.quantile(list(QUANTILES)).tolist()
    return {f"p{int(q * 100)}": float(v) for q, v in zip(QUANTILES, vals, strict=True)} | {
        "mean": float(s.mean()), "max": float(s.max())}


def itl_gaps(df: pd.DataFrame) -> pd.Series:
    """Every inter-token gap of every successful streamed request, as one Series."""
    lists = df.loc[df["ok"], "itl"].dropna()
    lists = lists[lists.map(lambda v: isinstance(v, list) and len(v) > 0)]
    if lists.empty:
        return pd.Series(dtype=float)
    return pd.Series(np.concatenate([np.asarray(v, dtype=float) for v in lists]))


def _ground_truth(ok: pd.DataFrame) -> dict | None:
    """Client-measured vs the mock's own schedule (x-mock-* headers), when the target is the mock."""
    gt = ok.dropna(subset=["mock_ttft_ms", "ttft_s"])
    gt = gt[gt["streamed"].astype(bool)]
    if gt.empty:
        return None
    ttft_err = (gt["ttft_s"] - gt["lag_s"].fillna(0) - gt["mock_ttft_ms"] / 1000.0).abs()
    tok = gt.dropna(subset=["mock_output_tokens"])
    return {"requests": len(gt), "ttft_abs_err_p50_s": float(ttft_err.quantile(0.5)),
            "ttft_abs_err_p99_s": float(ttft_err.quantile(0.99)),
            "output_tokens_mismatch": int((tok["output_tokens"] != tok["mock_output_tokens"]).sum())}


def max_in_window(times: np.ndarray, window: float, slack: float = 0.05) -> int:
    """Most accepted requests in one limit window, windows laid greedily as fixed-window limiters do.

    A window opens at the first accepted request after the previous one closed (the mock's limiter,
    and any limiter that starts a window on first use). Each such window is a window-long span, so a
    sliding-window or token-bucket limiter that keeps its promise passes this count too. Times are
    client send times: a request sent in the last `slack` seconds of a window may reach the server
    after it closed, so it is counted as opening the next one.
    """
    best, start, count = 0, None, 0
    for t in times:
        if start is None or t - start >= window - slack:
            start, count = t, 0
        count += 1
        best = max(best, count)
    return best


def _throttling(df: pd.DataFrame, meta: dict) -> dict:
    """Accepted rate, 429 share, Retry-After presence, recovery times and goodput."""
    window = float(meta.get("window_s") or 60.0)
    accepted = df[df["status"] == 200].sort_values("t_sent")
    limited = df[df["status"] == 429]
    advertised = pd.to_numeric(df["rl_limit_requests"], errors="coerce").dropna()
    recover = []
    if "logical" in df.columns and len(limited):
        for _, g in df.dropna(subset=["logical"]).groupby(["worker", "user", "logical"]):
            g = g.sort_values("attempt")
            first429 = g[g["status"] == 429]
            okrow = g[g["status"] == 200]
            if len(first429) and len(okrow):
                recover.append(float(okrow["t_end"].iloc[0] - first429["t_end"].iloc[0]))
    duration = float(meta.get("duration") or (df["t_end"].max() - df["t_sched"].min()) or 1.0)
    given = meta.get("limit_requests")
    return {"limit_requests": given or (float(advertised.iloc[0]) if len(advertised) else None),
            "limit_source": "flag" if given else "header",
            "window_s": window, "accepted": int(len(accepted)),
            "max_accepted_in_window": max_in_window(accepted["t_sent"].to_numpy(), window),
            "accepted_rate": len(accepted) / duration, "rate_limited": int(len(limited)),
            "rate_limited_ratio": len(limited) / len(df) if len(df) else 0.0,
            "missing_retry_after": int(limited["retry_after"].isna().sum()) if len(limited) else 0,
            "server_errors": int((df["status"] >= 500).sum()),
            "recover_s": _q(pd.Series(recover, dtype=float)), "recovered": len(recover),
            "goodput_tokens_s": float(accepted["output_tokens"].fillna(0).sum()) / duration}


def cost(df: pd.DataFrame, prices, model: str) -> dict:
    """Estimated cost of the rows' calls to `model` at a target's prices (opskit.core.pricing.Prices):
    {"currency", "total", "by_model", "unpriced_calls"}. Off-peak windows apply at each call's wall time;
    every call with tokens is billed, failed or not (a provider bills what its usage says)."""
    by_model: dict[str, float] = {}
    unpriced = 0
    cols = ("input_tokens", "cached_input_tokens", "output_tokens", "wall")
    for inp, cached, out, wall in df.reindex(columns=cols).itertuples(index=False):
        c = prices.cost(model, int(_num(inp)), int(_num(cached)), int(_num(out)), _num(wall))
        if c is None:
            unpriced += 1
        else:
            by_model[model] = by_model.get(model, 0.0) + c
    return {"currency": prices.currency, "total": sum(by_model.values()), "by_model": by_model,
            "unpriced_calls": unpriced}


def _num(v) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _hit_ratio(rows: pd.DataFrame) -> float | None:
    """Cached input tokens over input tokens (None when no input was counted)."""
    total = float(rows["input_tokens"].fillna(0).sum())
    return float(rows["cached_input_tokens"].fillna(0).sum()) / total if total else None


def summarize(df: pd.DataFrame, meta: dict | None = None) -> dict:
    """Numbers for one scenario's rows. `meta`: what was asked (duration, rate, rpm, ...)."""
    meta = meta or {}
    scenario = meta.get("scenario") or (str(df["scenario"].iloc[0]) if len(df) else "")
    duration = float(meta.get("duration") or 0) or float((df["t_end"].max() - df["t_sched"].min()) or 1.0)
    ok = df[df["ok"]]
    # TTFT, TTFOT and TPOT are of streamed calls only: a non-streamed call has a duration (DESIGN.md)
    streamed = ok[ok["streamed"].fillna(False).astype(bool)]
    # 429s are the expected answer in the throttling scenario, not errors; its own checks apply
    counted = df[df["status"] != 429] if scenario == "throttling" else df
    errors = counted[~counted["ok"]]
    out = {"scenario": scenario, "requests": int(len(df)), "ok": int(len(ok)),
           "errors": {str(k): int(v) for k, v in errors["error_type"].value_counts().items()},
           "error_ratio": float(len(errors) / len(counted)) if len(counted) else 0.0,
           "status": {str(k): int(v) for k, v in df["status"].value_counts().sort_index().items()},
           "duration_s": _q(ok["duration_s"]), "ttft_s": _q(streamed["ttft_s"]), "ttfot_s": _q(streamed["ttfot_s"]),
           "itl_s": _q(itl_gaps(df)), "tpot_s": _q(streamed["tpot_s"]), "out_tok_s_per_request": _q(ok["out_tok_s"]),
           "throughput_rps": len(ok) / duration,
           "output_tokens_s": float(ok["output_tokens"].fillna(0).sum()) / duration,
           "input_tokens": int(ok["input_tokens"].fillna(0).sum()),
           "output_tokens": int(ok["output_tokens"].fillna(0).sum()),
           # parts of input and output (DESIGN.md), from usages that state them
           "cached_input_tokens": int(ok["cached_input_tokens"].fillna(0).sum()),
           "reasoning_tokens": int(ok["reasoning_tokens"].fillna(0).sum()),
           "tokens_from_usage_ratio": float(ok["tokens_from_usage"].fillna(False).astype(bool).mean())
           if len(ok) else None,
           "streamed_ratio": float(ok["streamed"].fillna(False).astype(bool).mean()) if len(ok) else None,
           "duration": duration, "ground_truth": _ground_truth(ok)}
    if meta.get("requested_rate"):
        sent = df[df["t_sent"].notna() & (df["t_sent"] - df["t_sched"].min() <= duration)]
        out["requested_rate"] = float(meta["requested_rate"])
        out["achieved_rate"] = len(sent) / duration
        out["send_lag_s"] = _q(df["lag_s"])
        out["dropped"] = int(df["t_sent"].isna().sum())
    if scenario == "throttling":
        out["throttling"] = _throttling(df, meta)
    if scenario == "conversation" and len(ok):
        by_turn = ok.groupby(ok["turn"].fillna(0).astype(int))
        out["by_turn"] = {str(k): {"input_tokens_mean": float(g["input_tokens"].mean()),
                                   "cache_hit_ratio": _hit_ratio(g),
                                   "ttft_p95_s": float(g["ttft_s"].quantile(0.95))} for k, g in by_turn}
    return _clean(out)


def _clean(obj):
    """NaN -> None, numpy scalars -> Python, so the summary is plain JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
