"""opskit's own per-request log: one JSON object per line, one file per Locust process.

Locust rounds its statistics and times a streamed request to its headers only, so every request is
also written here with raw `time.perf_counter()` readings (CLOCK_MONOTONIC on Linux, so readings from
several processes on one host share a time base). `results` turns these files into a DataFrame.

Columns (None where not applicable):
  scenario, worker, user, seq    which process/user sent it, and its sequence number there
  turn, attempt                  conversation turn; retry attempt (1 = first try) when throttled
  wall                           epoch seconds at the scheduled time (for plots against clock time)
  t_sched, t_sent, t_end         perf_counter: scheduled send, actual send, last byte
  duration_s                     t_end - t_sched (DESIGN.md: from the scheduled time)
  ttft_s, ttfot_s                first text (content or reasoning) / first content, from t_sched
  itl                            list of inter-token gaps (s), each divided by the tokens of its chunk
  status, error_type, error      HTTP status (0: none), opskit.core.records error type, short reason
  input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, tokens_from_usage, text_chunks, streamed, transport
  retry_after, rl_limit_requests response headers of a throttled target (raw strings)
  mock_ttft_ms, mock_queue_ms, mock_output_tokens   ground truth from `opskit mock` when present
"""

from __future__ import annotations

import json
from pathlib import Path

FIELDS = ("scenario", "worker", "user", "seq", "turn", "attempt", "wall", "t_sched", "t_sent", "t_end",
          "duration_s", "ttft_s", "ttfot_s", "itl", "status", "error_type", "error", "input_tokens",
          "output_tokens", "cached_input_tokens", "reasoning_tokens", "tokens_from_usage", "text_chunks", "streamed", "transport", "retry_after",
          "rl_limit_requests", "mock_ttft_ms", "mock_queue_ms", "mock_output_tokens", "bytes")


class RequestLog:
    """Appends rows to `<dir>/requests-<scenario>-<worker>.jsonl`, buffered, flushed on demand."""

    def __init__(self, directory: str | Path, scenario: str, worker: int, flush_every: int = 256) -> None:
        self.path = Path(directory) / f"requests-{scenario}-{worker}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self._buf: list[str] = []
        self._flush_every = flush_every
        self.rows = 0

    def write(self, row: dict) -> None:
        """Queue one row (a dict with keys from FIELDS); written to disk every `flush_every` rows."""
        self._buf.append(json.dumps(row, separators=(",", ":")))
        self.rows += 1
        if len(self._buf) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        """Write queued rows now (each on its own line, so a crash leaves whole lines behind)."""
        if self._buf and not self._fh.closed:
            self._fh.write("\n".join(self._buf) + "\n")
            self._fh.flush()
            self._buf.clear()

    def close(self) -> None:
        """Flush and close the file."""
        self.flush()
        self._fh.close()


def read_rows(directory: str | Path) -> list[dict]:
    """Every row of every request log in `directory`; a torn last line (process killed) is skipped."""
    rows: list[dict] = []
    for path in sorted(Path(directory).glob("requests-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows
