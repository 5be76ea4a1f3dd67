"""Locust users for opskit's scenarios. Imported ONLY by the locustfiles in loadtests/ (it imports locust).

Every request goes through `ChatClient` (opskit's own timing), is written to the per-request log and is
reported to Locust's event hook with its full duration, so Locust's CSVs, HTML report and web UI show
whole-stream times instead of time-to-headers.

Open loop (qps): Locust is closed-loop by design (a user waits for its response before the next task).
`OpenLoopUser` is therefore a *scheduler*: one per Locust process, it walks this process's share of the
arrival schedule (opskit.loadtest.shapes) and, at each scheduled time, spawns a greenlet for that
request, without waiting for earlier ones. A slow target thus meets the same offered rate and its
slowness shows in the latency, which is measured from the scheduled time (no coordinated omission).
The alternative, `constant_pacing` with many users, silently lowers the rate once responses take
longer than the pacing interval, which is the very case a release gate must see.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import random
import time
from dataclasses import replace

import gevent
import gevent.pool
import locust.stats
from locust import User, constant, constant_pacing, events, task

from opskit.core import records
from opskit.loadtest import shapes
from opskit.loadtest.client import ChatClient, auth_for
from opskit.loadtest.log import RequestLog
from opskit.loadtest.loopwatch import LoopWatch
from opskit.loadtest.params import ENV, FATAL_PREFIX, RunParams
from opskit.loadtest.prompts import PromptSource, PromptSpec, conversation_messages, filler

# the runner's live progress line reads the stats-history CSV: have Locust write it every second
locust.stats.CSV_STATS_FLUSH_INTERVAL_SEC = 1

_close_csv_files = locust.stats.StatsCSVFileWriter.close_files


def _close_with_final_rows(self) -> None:
    """Locust closes its CSV files holding the rows of its last 1 s tick, so the calls of the final second
    were missing from them (qps 387 in the CSV, 400 in its log and HTML): write every file once more
    from the final stats first, as its writer loop does."""
    try:
        self.requests_csv_filehandle.seek(0)
        self.requests_csv_filehandle.truncate()
        self.requests_csv_writer.writerow(self.requests_csv_columns)
        self._requests_data_rows(self.requests_csv_writer)
        self._stats_history_data_rows(self.stats_history_csv_writer, time.time())
        for name in ("failures", "exceptions"):
            fh = getattr(self, f"{name}_csv_filehandle")
            fh.seek(getattr(self, f"{name}_csv_data_start"))
            getattr(self, f"_{name}_data_rows")(getattr(self, f"{name}_csv_writer"))
            fh.truncate()
    except (AttributeError, OSError, ValueError) as exc:  # another Locust version: its own files as they are
        logging.getLogger("opskit.loadtest").warning("final CSV rows not written: %s", exc)
    _close_csv_files(self)


locust.stats.StatsCSVFileWriter.close_files = _close_with_final_rows

# A collection pass over Locust's and Flask's ~10^5 long-lived objects stalls every greenlet for tens of
# ms, which would show up as late tokens: freeze what exists after import, and collect young objects rarely.
gc.collect()
gc.freeze()
gc.set_threshold(100_000, 50, 1000)

perf = time.perf_counter
# Locust starts all of a process's users in the same instant, so their first requests left as one burst:
# the client built and sent 100 requests while the first ones' clocks ran, and the target met 100
# connections at once (in the mock's ground truth, every first TTFT of a 100-user run was 20-60 ms off,
# 3 % of a 20 s run's requests). Users start one after another instead, START_GAP_S apart, all within
# START_SPREAD_S; each still sends back to back from then on.
START_GAP_S = 0.010
START_SPREAD_S = 1.0
# an overloaded scheduler stops this long after the end (Locust's own run time is >= 1 s longer): a
# little lateness at the end is normal on a busy machine and must not cost the last arrivals
END_GRACE_S = 0.5
OPEN_LOOP = ("qps", "replay")  # scenarios with one scheduler per process and a request in flight per arrival
WALL0 = time.time() - perf()   # perf_counter -> epoch seconds, for plots against clock time


class RequestFailure(Exception):
    """What Locust records as a failure: the error type and status, a bounded set of strings."""


class Process:
    """Per-Locust-process state: params, the shared HTTP client and the request log."""

    def __init__(self, params: RunParams) -> None:
        self.params = params
        auth, ws_auth = auth_for(params)
        pool = max(params.users, 16) if params.scenario not in OPEN_LOOP else params.max_inflight
        self.client = ChatClient(params.base_url, params.path, auth=auth, timeout_s=params.timeout_s,
                                 pool_size=pool, ws_auth=ws_auth)
        self.log = RequestLog(os.path.join(params.run_dir, "log"), params.scenario, params.worker)
        self.user_ids = itertools.count()
        self.refused_noted = False
        self._circuit_file = os.path.join(params.run_dir, "log", f"circuit-{params.scenario}.json")
        self._circuit, self._circuit_checked = False, 0.0
        # Users stop starting requests at this deadline; Locust's own run time is a little longer, so when
        # it stops the users they are idle and nothing in flight is cut off (or counted as an error).
        self.deadline = perf() + params.duration

    def over(self) -> bool:
        """No more requests: the run's deadline has passed, the credentials were refused, or the runner's
        circuit breaker opened."""
        return perf() >= self.deadline or self.client.refused is not None or self.circuit_open()

    def circuit_open(self) -> bool:
        """The runner wrote log/circuit-<scenario>.json (looked for at most every 0.2 s)."""
        now = perf()
        if not self._circuit and now - self._circuit_checked >= 0.2:
            self._circuit_checked = now
            self._circuit = os.path.exists(self._circuit_file)
        return self._circuit

    def check_refused(self) -> None:
        """Once the token endpoint refused the credentials, say so once, in one line, where the runner
        looks (it stops the run and exits 2 with it), instead of failing every request until the end."""
        if self.client.refused is None or self.refused_noted:
            return
        self.refused_noted = True
        path = os.path.join(self.params.run_dir, "log", f"{FATAL_PREFIX}{self.params.scenario}-{self.params.worker}.txt")
        with open(path, "w") as fh:
            fh.write(self.client.refused + "\n")
        logging.getLogger("opskit.loadtest").error("%s", self.client.refused)


_PROC: Process | None = None
_WATCH: LoopWatch | None = None


def proc(host: str | None = None, scenario: str | None = None) -> Process:
    """This process's state, created on first use; also starts the event-loop lag monitor.

    `host` (Locust's --host or the web UI's host field) is the target when the runner passed no params.
    """
    global _PROC, _WATCH
    if _PROC is None:
        params = RunParams.from_env()
        if ENV not in os.environ:  # run by hand: the locustfile names the scenario, --host the target
            params = replace(params, base_url=(host or params.base_url).rstrip("/"),
                             scenario=scenario or params.scenario)
        _PROC = Process(params)
        _WATCH = LoopWatch()
        _WATCH.start()
    return _PROC


def _write_lag() -> None:
    if _PROC is not None and _WATCH is not None:
        name = f"lag-{_PROC.params.scenario}-{_PROC.params.worker}.json"
        _WATCH.write(os.path.join(_PROC.params.run_dir, "log", name))


@events.test_stop.add_listener
def _flush(**_kw) -> None:
    if _PROC is not None:
        _PROC.log.flush()
        _write_lag()


@events.quitting.add_listener
def _close(**_kw) -> None:
    if _PROC is not None:
        _PROC.log.close()


def report(environment, row: dict, name: str) -> None:
    """Write a row to opskit's log and tell Locust about it."""
    p = proc()
    row["wall"] = WALL0 + row["t_sched"]
    p.log.write(row)
    exc = None
    if row.get("error_type"):
        exc = RequestFailure(f"{row['error_type']} (HTTP {row.get('status', 0)})")
    environment.events.request.fire(request_type="POST", name=name, response_time=row["duration_s"] * 1000.0,
                                    response_length=row.get("bytes") or 0, exception=exc, context={})


def start_delay(uid: int, users: int, workers: int = 1) -> float:
    """When the `uid`-th user of a process starts, after the first: START_GAP_S apart, closer when the
    process has more users than fit in START_SPREAD_S that way."""
    per_process = max(1, -(-users // max(1, workers)))
    return uid * min(START_GAP_S, START_SPREAD_S / per_process)


class ChatUser(User):
    """Base user: builds a request body from the prompt source and sends it through the shared client."""

    abstract = True
    wait_time = constant(0)
    scenario = "streaming"

    def on_start(self) -> None:
        """Per-user state: its id, its own seeded prompt source and RNG."""
        self.p = proc(self.host, self.scenario)
        self.uid = next(self.p.user_ids)
        seed = self.p.params.seed * 100_000 + self.p.params.worker * 1000 + self.uid
        self.prompts = PromptSource(PromptSpec(**self.p.params.prompt), seed=seed)
        self.rng = random.Random(seed)
        self.seq = 0
        gevent.sleep(start_delay(self.uid, self.p.params.users, self.p.params.workers))

    def body(self, messages: list[dict], max_tokens: int) -> dict:
        """A chat/completions request body (streamed with include_usage unless --no-stream)."""
        prm = self.p.params
        body = {"model": prm.model, "messages": messages, "max_tokens": max_tokens, "stream": prm.stream}
        if prm.stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def send(self, body: dict, t_sched: float | None = None, **extra) -> dict:
        """One request, logged and reported. A run stopped mid-request logs it as a client disconnect."""
        prm = self.p.params
        self.seq += 1
        base = {"scenario": prm.scenario, "worker": prm.worker, "user": self.uid, "seq": self.seq, **extra}
        transport = prm.transport if prm.stream else "sse"
        try:
            row = self.p.client.call(body, t_sched, transport)
        except gevent.GreenletExit:
            now = perf()
            t0 = now if t_sched is None else t_sched
            report(self.environment, {**base, "t_sched": t0, "t_sent": t0, "t_end": now, "duration_s": now - t0,
                                      "status": 0, "error_type": records.CLIENT_DISCONNECT,
                                      "error": "run stopped"}, prm.scenario)
            raise
        row.update(base)
        report(self.environment, row, prm.scenario)
        self.p.check_refused()
        return row


class OpenLoopUser(ChatUser):
    """The open-loop scheduler: one per process, a greenlet per request at its scheduled time."""

    abstract = True
    scenario = "qps"

    def on_start(self) -> None:
        """The schedule has not run yet."""
        super().on_start()
        self.done = False

    @task
    def run_schedule(self) -> None:
        """Walk this process's share of the arrival schedule, one greenlet per request, until its end.

        Behind schedule it still yields once per arrival: a scheduler that never slept starved its own
        requests and Locust's stop (`--rate 1e12` never ended). It stops walking END_GRACE_S after the
        end of the run whatever the load; arrivals it could not reach by then are not sent, and the
        report's achieved rate shows the shortfall against the requested one.
        """
        if self.done:  # schedule finished: idle until Locust's run time ends and it stops us
            gevent.sleep(0.05)
            return
        prm = self.p.params
        spec = shapes.ArrivalSpec(**prm.arrival)
        pool = gevent.pool.Pool()
        start = perf()
        end = start + prm.duration
        for offset in shapes.arrivals(spec, prm.duration, prm.worker, prm.workers):
            t = start + offset
            delay = t - perf()
            gevent.sleep(max(0.0, delay))  # sleep(0) when behind: let the sends and Locust run
            if perf() >= end + END_GRACE_S or self.p.client.refused is not None or self.p.circuit_open():
                break
            if len(pool) >= prm.max_inflight:
                self._dropped(t)
                continue
            messages, max_tokens = self.prompts.next()
            pool.spawn(self.send, self.body(messages, max_tokens), t)
        pool.join(timeout=prm.timeout_s + 5)
        self.done = True

    def _dropped(self, t: float) -> None:
        """Too many requests in flight: counted as a client-side failure, never silently skipped."""
        self.seq += 1
        now = perf()
        report(self.environment, {"scenario": self.p.params.scenario, "worker": self.p.params.worker,
                                  "user": self.uid, "seq": self.seq, "t_sched": t, "t_sent": None, "t_end": now,
                                  "duration_s": now - t, "status": 0, "error_type": records.CONNECTION,
                                  "error": "dropped: max in-flight reached"}, self.p.params.scenario)


class StreamingUser(ChatUser):
    """Closed loop: each user streams one chat after another (SSE, or WebSocket with transport=ws)."""

    abstract = True
    scenario = "streaming"

    @task
    def chat(self) -> None:
        """One streaming chat."""
        if self.p.over():
            gevent.sleep(0.05)  # run over: idle until Locust stops us
            return
        messages, max_tokens = self.prompts.next()
        self.send(self.body(messages, max_tokens))


class ConversationUser(ChatUser):
    """Multi-turn chats: each turn sends system + the last N turns + a new question, so context grows."""

    abstract = True
    scenario = "conversation"
    wait_time = constant(0.05)

    @task
    def conversation(self) -> None:
        """One multi-turn chat."""
        prm = self.p.params
        turns: list[tuple[str, str]] = []
        for turn in range(1, prm.turns + 1):
            if self.p.over():
                return
            question = self.prompts.user_text()
            messages = conversation_messages(self.prompts.spec.system, turns, question, prm.keep_turns)
            row = self.send(self.body(messages, self.prompts.output_tokens()), turn=turn)
            if row.get("error_type"):
                return  # a broken turn ends the chat; the next one starts afresh
            # the reply's content does not change the server's cost: replay filler of the same length
            turns.append((question, filler(max(1, row.get("output_tokens") or 1), self.rng)))


class ThrottledUser(ChatUser):
    """Drives above the advertised limit and backs off on 429: Retry-After, else capped jittered back-off.

    Each logical request is retried until it succeeds or `max_attempts` is reached; every attempt is
    logged with its attempt number, so the throttling checks can see accepted rate, 429 share, missing
    Retry-After headers and how long each client took to recover.
    """

    abstract = True
    scenario = "throttling"

    def wait_time(self) -> float:
        """Pacing so that all users together offer `overdrive` times the limit."""
        prm = self.p.params
        offered = prm.overdrive * (prm.limit_requests or 60.0) / min(prm.window_s, prm.duration)
        return constant_pacing(max(1, prm.users) / offered)(self)

    @task
    def throttled(self) -> None:
        """One logical request, retried with back-off while the target answers 429."""
        prm = self.p.params
        if self.p.over():
            gevent.sleep(0.05)
            return
        messages, max_tokens = self.prompts.next()
        body = self.body(messages, max_tokens)
        logical = self.seq + 1
        for attempt in range(1, prm.max_attempts + 1):
            row = self.send(body, attempt=attempt, logical=logical)
            if row.get("status") != 429:
                return
            wait = shapes.backoff_delay(attempt, shapes.parse_retry_after(row.get("retry_after")), self.rng,
                                        prm.backoff_base_s, prm.backoff_cap_s)
            if perf() + wait > self.p.deadline:
                return  # would wait past the end of the run: this client is done
            gevent.sleep(wait)
