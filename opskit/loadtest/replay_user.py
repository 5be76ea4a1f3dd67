"""The replay scheduler, a Locust user (runs inside Locust processes only: it imports locust via users).

Open loop, as the qps scheduler: one user per Locust process walks its share of the schedule
(`<run>/replay/schedule.jsonl`, every N-th entry with N processes) and starts each request in a greenlet
of its own at its recorded offset, whatever the target is doing, so a slow target meets the traffic
production offered, and latency is measured from the scheduled time (DESIGN.md).
"""

from __future__ import annotations

import gevent
import gevent.pool
from locust import task

from opskit.loadtest.replay_plan import PromptBuilder, read_schedule
from opskit.loadtest.users import END_GRACE_S, OpenLoopUser, perf


class ReplayUser(OpenLoopUser):
    """Sends the trace's requests at their offsets: recorded model, stream flag, lengths and prefixes."""

    abstract = True
    scenario = "replay"

    def on_start(self) -> None:
        """Read this process's share of the schedule."""
        super().on_start()
        prm = self.p.params
        self.entries = read_schedule(prm.schedule, prm.worker, prm.workers) if prm.schedule else []
        self.builder = PromptBuilder(prm.seed)

    def replay_body(self, e: dict) -> dict:
        """The request of one schedule entry."""
        body = {"model": e["model"], "messages": [{"role": "user", "content": self.builder.prompt(e)}],
                "max_tokens": int(e["output"]), "stream": bool(e["stream"])}
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        if self.p.params.ignore_eos:  # vLLM/SGLang: generate exactly max_tokens, as recorded
            body["ignore_eos"] = True
        return body

    @task
    def run_schedule(self) -> None:
        """Walk the schedule; like the qps scheduler it yields once per arrival when behind, stops
        END_GRACE_S after the end, and counts (never skips silently) requests past max in-flight."""
        if self.done:
            gevent.sleep(0.05)
            return
        prm = self.p.params
        pool = gevent.pool.Pool()
        start = perf()
        end = start + prm.duration
        for e in self.entries:
            t = start + float(e["at"])
            gevent.sleep(max(0.0, t - perf()))
            if perf() >= end + END_GRACE_S or self.p.client.refused is not None or self.p.circuit_open():
                break
            tags = {"trace_line": e["line"], "trace_index": e["i"], "model": e["model"], "rec_model": e["rec_model"]}
            if len(pool) >= prm.max_inflight:
                self._dropped(t)
                continue
            pool.spawn(self.send, self.replay_body(e), t, **tags)
        pool.join(timeout=prm.timeout_s + 5)
        self.done = True
