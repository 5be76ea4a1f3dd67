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

from opskit.core import records
from opskit.loadtest.replay_plan import PromptBuilder, read_schedule
from opskit.loadtest.users import END_GRACE_S, ChatUser, perf, report


class ReplayUser(ChatUser):
    """Sends the trace's requests at their offsets: recorded model, stream flag, lengths and prefixes.
    (Not a subclass of the qps scheduler: Locust would run its task, the qps schedule, beside this one.)"""

    abstract = True
    scenario = "replay"

    def on_start(self) -> None:
        """Read this process's share of the schedule."""
        super().on_start()
        self.done = False
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
                self._dropped(t, tags)
                continue
            pool.spawn(self.send, self.replay_body(e), t, **tags)
        pool.join(timeout=prm.timeout_s + 5)
        self.done = True

    def _dropped(self, t: float, tags: dict) -> None:
        """Too many requests in flight: counted as a client-side failure, never silently skipped."""
        self.seq += 1
        now, prm = perf(), self.p.params
        report(self.environment, {"scenario": prm.scenario, "worker": prm.worker, "user": self.uid, "seq": self.seq,
                                  "t_sched": t, "t_sent": None, "t_end": now, "duration_s": now - t, "status": 0,
                                  "error_type": records.CONNECTION, "error": "dropped: max in-flight reached",
                                  **tags}, prm.scenario)
