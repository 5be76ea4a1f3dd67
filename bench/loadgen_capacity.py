"""How much load one Locust process of `opskit loadtest` can generate, and how exactly it measures.

Prints three tables (figures recorded in bench/README.md, section "loadgen"):

1. open loop: the highest rate one process holds within 1 % of target (non-streamed, fast mock:
   no TTFT, no ITL, 1 output token), and the same with --processes 2;
2. streams: for N concurrent streams (20 tokens/s each, 100 ms TTFT, no jitter), the Locust
   process's own event-loop lag (how late it wakes a sleeping greenlet: what it adds to every token
   it reads) and the measured TTFT minus the mock's schedule (which also contains the mock's own
   lateness); the most streams held while the generator's own lag p99 stays <= 5 ms;
3. accuracy at 100 streams: TTFT, ITL and duration against the mock's ground truth, and token counts;
4. (--part=truth) the product's own run, `opskit loadtest streaming --users 100 --no-proxy --duration 20`
   with its embedded mock and default placement, three times: the report's "vs mock ground truth"
   TTFT |error| p50/p99, the Locust process's own lag, and how long the OS kept it waiting for a CPU
   (other processes' share of the machine: the noise in every figure here).

The mock and Locust are pinned to different cores with taskset when there are two or more.
Usage: .venv/bin/python bench/loadgen_capacity.py [--quick] [--part=open|streams|truth] [--no-pin]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opskit.loadtest import results  # noqa: E402

PIN = shutil.which("taskset") and (os.cpu_count() or 1) >= 2 and "--no-pin" not in sys.argv



def _row_text(row: dict) -> str:
    """One measured level as `key=value` pairs (numpy scalars printed as plain numbers)."""
    return "  ".join(f"{k}={float(v):g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())

def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if PIN else argv


def start_mock(tmp: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    ready = tmp / f"mock-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(pinned(1, [sys.executable, "-m", "opskit", "mock", "--listen", "127.0.0.1:0",
                                       "--ready-file", str(ready), "--capacity", "5000", *flags]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if ready.exists() and ready.stat().st_size:
            return proc, json.loads(ready.read_text())["url"]
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("mock did not start")


def loadtest(tmp: Path, url: str, *args: str, pin: bool = True) -> pd.DataFrame:
    out = tmp / f"run-{time.monotonic_ns()}"
    argv = [sys.executable, "-m", "opskit", "loadtest", *args, "--target", url, "--no-proxy", "--out", str(out)]
    subprocess.run(pinned(0, argv) if pin else argv, cwd=ROOT, capture_output=True, timeout=300)
    runs = sorted(out.glob("*/"))
    if not runs:
        raise SystemExit(f"no run directory for {args}")
    df = results.load(runs[-1])
    df.attrs["run_dir"] = runs[-1]
    return df


def open_loop(tmp: Path, url: str, rates: list[int], processes: int, duration: int) -> list[dict]:
    rows = []
    for rate in rates:
        # one process: pinned to core 0 (the mock has core 1); two: both cores, shared with the mock
        df = loadtest(tmp, url, "qps", "--no-stream", "--rate", str(rate), "--duration", str(duration),
                      "--processes", str(processes), "--output-tokens", "1", "--output-spread", "0",
                      "--input-tokens", "8", "--input-spread", "0", pin=processes == 1)
        s = results.summarize(df, {"scenario": "qps", "duration": duration, "requested_rate": rate})
        rows.append({"processes": processes, "rate": rate, "achieved": round(s["achieved_rate"], 1),
                     "ratio": round(s["achieved_rate"] / rate, 4), "lag_p99_ms": round(1000 * s["send_lag_s"]["p99"], 2),
                     "ok": s["ok"], "errors": sum(s["errors"].values())})
        print(_row_text(rows[-1]), flush=True)
    return rows


def summary_rates(rows: list[dict]) -> tuple[int, int]:
    """(highest rate within 1 % of target, highest that also kept the send lag p99 <= 20 ms)."""
    ok = [r for r in rows if r["ratio"] >= 0.99 and r["errors"] == 0]
    return (max([r["rate"] for r in ok], default=0),
            max([r["rate"] for r in ok if r["lag_p99_ms"] <= 20], default=0))


def stream_errors(df: pd.DataFrame, itl: float, tokens: int) -> dict:
    steady = df[(df["seq"] > 1) & df["ok"]]  # first request per user pays for its TCP connect
    ttft = (steady["ttft_s"] - steady["mock_ttft_ms"] / 1000)
    dur = (steady["duration_s"] - (steady["mock_ttft_ms"] / 1000 + (tokens - 1) * itl))
    gaps = pd.Series([g for gs in steady["itl"] for g in gs]) - itl
    return {"requests": len(df), "ok": int(df["ok"].sum()),
            "ttft_add_p50_ms": round(1000 * ttft.quantile(0.5), 2), "ttft_add_p99_ms": round(1000 * ttft.quantile(0.99), 2),
            "itl_abs_err_p99_ms": round(1000 * gaps.abs().quantile(0.99), 2),
            "duration_abs_err_p99_ms": round(1000 * dur.abs().quantile(0.99), 2),
            "token_mismatches": int((df["output_tokens"] != df["mock_output_tokens"]).sum())}


def streams(tmp: Path, url: str, users: list[int], duration: int) -> list[dict]:
    rows = []
    for n in users:
        df = loadtest(tmp, url, "streaming", "--users", str(n), "--duration", str(duration),
                      "--output-tokens", "40", "--output-spread", "0")
        lag = results.client_lag(df.attrs["run_dir"], "streaming") or {}
        rows.append({"streams": n, "own_lag_p50_ms": round(1000 * lag.get("p50", 0), 2),
                     "own_lag_p99_ms": round(1000 * lag.get("p99", 0), 2), **stream_errors(df, 0.050, 20),
                     "cpu_pct": round(100 * lag.get("cpu_s", 0) / duration), "cpu_wait_pct": waited(lag, duration)})
        print(_row_text(rows[-1]), flush=True)
    return rows


def waited(lag: dict, seconds: float) -> float:
    """How long the Locust process was runnable but kept off every CPU, as % of the run."""
    return round(100 * lag.get("cpu_wait_s", 0) / seconds, 1)


def truth_part(tmp: Path, runs: int = 3) -> None:
    """The product's own 100-stream run, as a user starts it (embedded mock, default placement)."""
    print("\n# opskit loadtest streaming --users 100 --no-proxy --duration 20 (embedded mock, default placement)",
          flush=True)
    for i in range(runs):
        load = os.getloadavg()[0]
        out = tmp / f"truth-{i}"
        subprocess.run([sys.executable, "-m", "opskit", "loadtest", "streaming", "--users", "100", "--no-proxy",
                        "--duration", "20", "--out", str(out)], cwd=ROOT, capture_output=True, timeout=300)
        run = sorted(out.glob("*/"))[-1]
        s = json.loads((run / "summary.json").read_text())["scenarios"]["streaming"]
        g, lag = s["ground_truth"], s.get("client_lag_s") or {}
        print(_row_text({"run": i + 1, "requests": g["requests"],
                         "ttft_abs_err_p50_ms": round(1000 * g["ttft_abs_err_p50_s"], 2),
                         "ttft_abs_err_p99_ms": round(1000 * g["ttft_abs_err_p99_s"], 2),
                         "own_lag_p99_ms": round(1000 * lag.get("p99", 0), 2),
                         "own_lag_max_ms": round(1000 * lag.get("max", 0), 2),
                         "cpu_wait_pct": waited(lag, 20), "load_before": round(load, 1)}), flush=True)


def main() -> None:
    quick = "--quick" in sys.argv
    print(f"cores: {os.cpu_count()}, pinned: {bool(PIN)} (mock on core 1, Locust on core 0); "
          f"this machine is shared with other engineers' work; load average {os.getloadavg()[0]:.1f}", flush=True)
    part = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--part=")), "all")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if part in ("all", "open"):
            open_part(tmp, quick)
        if part in ("all", "streams"):
            streams_part(tmp, quick)
        if part in ("all", "truth"):
            truth_part(tmp, 1 if quick else 3)


def open_part(tmp: Path, quick: bool) -> None:
    mock, url = start_mock(tmp, "--ttft-ms", "0", "--ttft-jitter-ms", "0", "--itl-ms", "0", "--itl-jitter-ms", "0",
                           "--output-tokens-mean", "1", "--output-tokens-spread", "0")
    try:
        print("\n# open loop, non-streamed, fast mock", flush=True)
        rates = [500, 1000, 1500] if quick else [500, 1000, 1500, 2000, 2500]
        one = open_loop(tmp, url, rates, 1, 5)
        held, tight = summary_rates(one)
        print(f"one process: highest rate within 1 % of target {held} req/s; "
              f"with send lag p99 <= 20 ms too: {tight} req/s", flush=True)
        two = open_loop(tmp, url, [tight, int(1.5 * tight), 2 * tight] if tight else [500], 2, 5)
        held2, tight2 = summary_rates(two)
        print(f"--processes 2: within 1 %: {held2} req/s; with lag p99 <= 20 ms: {tight2} req/s", flush=True)
    finally:
        mock.kill()


def streams_part(tmp: Path, quick: bool) -> None:
    mock, url = start_mock(tmp, "--ttft-ms", "100", "--ttft-jitter-ms", "0", "--itl-ms", "50",
                           "--itl-jitter-ms", "0", "--output-tokens-mean", "20", "--output-tokens-spread", "0")
    try:
        print("\n# concurrent streams, 20 tokens/s each, client-added TTFT vs the mock's schedule", flush=True)
        table = streams(tmp, url, [100, 250] if quick else [100, 250, 500, 750, 1000], 6)
        most = max([r["streams"] for r in table if r["own_lag_p99_ms"] <= 5 and r["ok"] == r["requests"]],
                   default=0)
        most_gt = max([r["streams"] for r in table if r["ttft_add_p99_ms"] <= 5 and r["ok"] == r["requests"]],
                      default=0)
        print(f"most streams held with the generator's own loop lag p99 <= 5 ms: {most}; "
              f"with TTFT p99 <= 5 ms above the mock's schedule (mock lateness included): {most_gt}", flush=True)
        acc = table[0]
        print(f"load average {os.getloadavg()[0]:.1f}")
        print(f"\n# accuracy at 100 streams: TTFT added p99 {acc['ttft_add_p99_ms']} ms, ITL |err| p99 "
              f"{acc['itl_abs_err_p99_ms']} ms, duration |err| p99 {acc['duration_abs_err_p99_ms']} ms, "
              f"token mismatches {acc['token_mismatches']}", flush=True)
    finally:
        mock.kill()


if __name__ == "__main__":
    main()
