"""How long `opskit loadtest capacity` takes against the mock, and how close it lands to the mock's
known capacity: C concurrent generations, each holding its slot for TTFT + (N - 1) x ITL (token j is
due at TTFT plus the gaps before it), so C / (TTFT + (N - 1) x ITL) requests/s.

Three capacities, each searched from the same start (8 req/s, x2 ramp, bisection to 10 %), and the
middle one searched twice to see whether two searches agree within their intervals.
Usage: .venv/bin/python bench/capacity_search.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opskit.loadtest import capacity_run, runner  # noqa: E402
from opskit.loadtest.capacity import SearchPlan  # noqa: E402

TTFT_MS, ITL_MS, TOKENS = 20, 10, 10


def one(slots: int, out: Path) -> dict:
    mock = ["--capacity", str(slots), "--ttft-ms", str(TTFT_MS), "--ttft-jitter-ms", "0", "--itl-ms", str(ITL_MS),
            "--itl-jitter-ms", "0", "--output-tokens-mean", str(TOKENS), "--output-tokens-spread", "0"]
    truth = slots / ((TTFT_MS + (TOKENS - 1) * ITL_MS) / 1000)
    opts = runner.Options(scenarios=("qps",), duration=5, mock_args=mock, out_dir=out)
    t0 = time.monotonic()
    s, _ = capacity_run.run(opts, "rate", SearchPlan(start=8, resolution=0.1, budget_s=600), None,
                            lambda _l: None, lambda _l: None)
    took = time.monotonic() - t0
    low, high = s["interval"]
    return {"slots": slots, "true_rps": round(truth, 1), "found_rps": round(s["max_load"] or 0, 1),
            "interval": f"[{low:.1f}, {high:.1f})" if high else f"[{low:.1f}, -)",
            "error_pct": round(100 * ((s["max_load"] or 0) - truth) / truth, 1),
            "truth_in_interval": bool(high and low <= truth < high), "levels": len(s["levels"]),
            "requests": sum(lv["requests"] for lv in s["levels"]), "search_s": round(took)}


def main() -> None:
    slots = [4] if "--quick" in sys.argv else [2, 4, 8, 4]
    with tempfile.TemporaryDirectory() as tmp:
        for n in slots:
            row = one(n, Path(tmp))
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
