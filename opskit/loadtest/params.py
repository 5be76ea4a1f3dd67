"""What a Locust process needs to know about its run, passed from the runner in one env variable.

The runner serialises `RunParams` to JSON in $OPSKIT_LT_PARAMS for every Locust process it starts
(master and workers; each worker also gets its own index). Secrets are never in it: the Locust
process loads the target's auth itself from the same config file / environment as the runner.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

ENV = "OPSKIT_LT_PARAMS"
FATAL_PREFIX = "fatal-"   # <run_dir>/log/fatal-<scenario>-<worker>.txt: why a Locust process cannot go on


@dataclass(frozen=True)
class RunParams:
    """One scenario run. Times in seconds, rates in requests/s."""

    scenario: str = "streaming"
    run_dir: str = "."
    base_url: str = "http://127.0.0.1:8000"   # where requests go (the metering proxy when routed)
    path: str = "/chat/completions"          # appended to the target's API root (config.py)
    config_path: str | None = None            # where auth comes from (loaded in the Locust process)
    target_url: str | None = None
    target_name: str | None = None
    model: str = "deepseek-chat"
    duration: float = float("inf")            # users stop starting requests after this; inf: Locust decides
    users: int = 10
    worker: int = 0
    workers: int = 1
    seed: int = 1
    timeout_s: float = 60.0
    stream: bool = True
    transport: str = "sse"                    # sse | ws (the mock's WebSocket transport)
    prompt: dict = field(default_factory=dict)   # PromptSpec fields
    arrival: dict = field(default_factory=dict)  # ArrivalSpec fields (qps)
    max_inflight: int = 2000                  # open loop: beyond this a request is dropped and counted
    turns: int = 4                            # conversation: turns per chat
    keep_turns: int = 3                       # conversation: history kept (system + last N turns)
    limit_requests: float | None = None       # throttling: requests the target allows per window
    overdrive: float = 2.0                    # throttling: offered load as a multiple of the limit
    window_s: float = 60.0                    # throttling: the limit's window (60 s: requests/minute)
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    max_attempts: int = 6
    schedule: str | None = None               # replay: the schedule JSONL (<run>/replay/schedule.jsonl)
    ignore_eos: bool = False                  # replay: ask vLLM/SGLang for exactly max_tokens

    def to_env(self) -> str:
        """The JSON that goes into $OPSKIT_LT_PARAMS."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RunParams:
        """The params the runner passed; defaults when run by hand (`locust -f loadtests/x.py`)."""
        env = os.environ if environ is None else environ
        raw = env.get(ENV)
        if not raw:
            # run by hand (`locust -f loadtests/x.py`, web UI): no end of its own, Locust decides
            return cls(base_url=env.get("OPSKIT_TARGET_URL", cls.base_url),
                       run_dir=os.path.join("reports", "interactive"), target_url=env.get("OPSKIT_TARGET_URL"))
        data = json.loads(raw)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
