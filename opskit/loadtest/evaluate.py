"""`opskit report evaluate RUN_DIR`: the gate's verdict, summary.json and report.html from per-request
logs that any number of Locust processes wrote under `RUN_DIR/log/` (a distributed release run on a
shared volume), judged exactly as `opskit loadtest` judges its own runs.

What was asked (duration, users, the open-loop rate) comes from the run's params: the same JSON the
workers were given in $OPSKIT_LT_PARAMS (`--params FILE`, else that variable). Without them the
duration is read off the logs and an open-loop run's achieved rate is not judged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from opskit.core.cli_helpers import redact_url
from opskit.core.config import ConfigError
from opskit.loadtest import gate, results, runner, slo
from opskit.loadtest.params import ENV, RunParams
from opskit.loadtest.slo import Verdict


def read_params(path: str | None) -> RunParams | None:
    """The run's params from a JSON file or $OPSKIT_LT_PARAMS; None when neither is given."""
    raw = Path(path).read_text() if path else os.environ.get(ENV)
    if not raw:
        return None
    try:
        return RunParams.from_env({ENV: raw})
    except (ValueError, TypeError) as exc:
        raise ConfigError(path or f"${ENV}", "", f"the run's params as JSON ({exc.__class__.__name__})") from None


def evaluate(run_dir: Path, params: RunParams | None, slo_file: str | None) -> tuple[Verdict, dict]:
    """Judge every scenario in the run's logs; write summary.json and report.html. (verdict, metas)."""
    df = results.load(run_dir)
    if not len(df):
        raise ConfigError(str(run_dir / "log"), "", "per-request logs (requests-*.jsonl) written by opskit's users")
    table = slo.load(slo_file or (gate.DEFAULT_SLO_FILE if gate.DEFAULT_SLO_FILE.exists() else None))
    verdict, metas = Verdict(), {}
    for scenario in sorted(df["scenario"].dropna().unique()):
        rows = df[df["scenario"] == scenario]
        if params is not None and params.scenario == scenario:
            meta = runner.meta_for(params)
        else:  # what the logs alone say
            meta = {"scenario": scenario, "duration": float(rows["t_end"].max() - rows["t_sched"].min())}
        meta["processes"] = int(rows["worker"].nunique())
        v = slo.evaluate(rows, slo.for_scenario(table, scenario), meta)
        verdict.extend(v)
        metas[scenario] = meta
    target = redact_url(params.base_url) if params is not None else "unknown (no params)"
    notes = [f"evaluated from the logs of {int(df['worker'].nunique())} Locust processes"]
    gate.write(run_dir, verdict, metas, target, notes)
    return verdict, metas


def main_text(verdict: Verdict, run_dir: Path) -> str:
    """What the command prints after the verdict table."""
    from opskit.loadtest import report

    summary = json.loads((run_dir / "summary.json").read_text())
    return f"{report.render(verdict)}\nreport: {run_dir / 'report.html'} ({len(summary['scenarios'])} scenarios)"
