"""Traces to replay: opskit's own call log, the public Mooncake trace and the Azure LLM inference trace.
Pure parsing: no network, no Locust.

Formats (auto-detected, or named with `--format`):

  opskit    the metering proxy's call log (`opskit exporter --call-log DIR`), format version 1: one JSON
            object per line in `calls-*.jsonl` / `calls-*.jsonl.gz` (a file, or a directory of them):
            `ts` (UTC start, ISO 8601), `model`, `stream`, `status`, `error_type`, `duration_s`, `ttft_s`,
            `tokens.input` / `tokens.output`, `max_tokens`, `prefix_block_chars`, `prefix_hashes`.
  mooncake  Mooncake's trace JSONL (kvcache-ai/Mooncake, FAST'25): `timestamp` (ms from the trace start),
            `input_length`, `output_length`, `hash_ids` (one id per 512-token block of the prompt).
  azure     Azure LLM inference trace CSV (Azure/AzurePublicDataset): `TIMESTAMP`, `ContextTokens`,
            `GeneratedTokens`.

Every usable line becomes a TraceRequest: its offset from the trace's first request, the model (opskit
only), the stream flag (opskit only), input and output lengths in tokens, its prompt's shared-prefix
blocks (key, tokens) and, for opskit's log, the latency it was recorded with. A line that cannot be read
is skipped and kept, with its line number and why, in Trace.skipped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

FORMATS = ("opskit", "mooncake", "azure")
MOONCAKE_BLOCK_TOKENS = 512   # Mooncake's hash_ids: one per 512-token block
CHARS_PER_TOKEN = 4           # how opskit's synthetic text is sized (prompts.py: one 4-character word a token)
SKIPPED_KEPT = 1000           # line numbers kept for the report (the count is always exact)


class TraceError(Exception):
    """The trace cannot be replayed at all (unreadable, unknown format, no usable line): one line."""


@dataclass(frozen=True)
class TraceRequest:
    """One recorded call, as replay needs it."""

    line: int                       # line number in its file (1-based), for the report
    t: float                        # seconds since the epoch (opskit, azure) or since the trace start (mooncake)
    input_tokens: int
    output_tokens: int
    model: str | None = None
    stream: bool | None = None
    blocks: tuple[tuple[str, int], ...] = ()   # shared-prefix blocks: (key, tokens); equal keys = equal text
    ok: bool = True                 # the recorded call succeeded (its latency is comparable)
    duration_s: float | None = None
    ttft_s: float | None = None
    source: str = ""                # file name, when the trace is a directory of files


@dataclass
class Trace:
    """A parsed trace, in time order."""

    format: str
    requests: list[TraceRequest] = field(default_factory=list)
    skipped: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, why), first SKIPPED_KEPT
    skipped_count: int = 0
    lines: int = 0
    first_t: float | None = None
    stopped: str | None = None      # where reading stopped early (`stop_after`), in words

    @property
    def has_latency(self) -> bool:
        """Whether the trace recorded latencies (opskit's log does; Mooncake and Azure do not)."""
        return any(r.duration_s is not None for r in self.requests)

    def skip(self, source: str, line: int, why: str) -> None:
        """Count a malformed line (its number kept for the report)."""
        self.skipped_count += 1
        if len(self.skipped) < SKIPPED_KEPT:
            self.skipped.append((source, line, why))


def files_of(path: Path) -> list[Path]:
    """The trace's files: the path itself, or a directory's *.jsonl, *.jsonl.gz, *.csv in name order."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz", ".csv")))
        if not found:
            raise TraceError(f"{path}: no *.jsonl, *.jsonl.gz or *.csv file in this directory")
        return found
    if not path.is_file():
        raise TraceError(f"{path}: no such file or directory")
    return [path]


def _lines(path: Path, trace: Trace | None = None) -> Iterator[str]:
    """The file's lines (a .gz decompressed as read). A file that cannot be opened is a TraceError; one
    that breaks off (a compressed file cut short) ends there, noted as a skipped line when `trace` is given."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        fh = opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with fh:
        n = 0
        try:
            for n, line in enumerate(fh, 1):  # noqa: B007 (n: where it broke off)
                yield line
        except (OSError, EOFError) as exc:
            if trace is None:
                raise TraceError(f"{path}: cannot read ({exc})") from None
            trace.skip(path.name, n + 1, f"the file breaks off here ({exc.__class__.__name__})")


def detect(path: Path) -> str:
    """The format of a trace file or directory, from its first non-empty line (or its name)."""
    first = files_of(path)[0]
    for raw in _lines(first):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                obj = {}
            if "ts" in obj or "v" in obj:
                return "opskit"
            if "hash_ids" in obj or "input_length" in obj or "timestamp" in obj:
                return "mooncake"
        if "TIMESTAMP" in line and "ContextTokens" in line:
            return "azure"
        break
    if first.name.endswith(".csv"):
        return "azure"
    raise TraceError(f"{first}: not a trace opskit knows (opskit call log, Mooncake JSONL, Azure CSV); "
                     "name one with --format")


def _int(v, name: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < minimum:
        raise ValueError(f"{name} must be a number >= {minimum}")
    return int(v)


def _opt_float(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        return None
    return float(v)


def _iso(value) -> float:
    if not isinstance(value, str):
        raise ValueError("ts must be an ISO 8601 time")
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def parse_opskit(obj: dict, line: int) -> TraceRequest:
    """A call-log record (format version 1) as a TraceRequest; ValueError when unusable."""
    if obj.get("v") not in (1, None):
        raise ValueError(f"format version {obj.get('v')!r} (this opskit reads 1)")
    t = _iso(obj.get("ts"))
    tokens = obj.get("tokens") if isinstance(obj.get("tokens"), dict) else {}
    hashes = obj.get("prefix_hashes") or []
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        raise ValueError("prefix_hashes must be a list of strings")
    block_chars = obj.get("prefix_block_chars") or 256
    per_block = max(1, _int(block_chars, "prefix_block_chars", 1) // CHARS_PER_TOKEN)
    inp = tokens.get("input")
    # no usage recorded (a failed call): the prompt was at least its full blocks, and half a block more
    inp = _int(inp, "tokens.input", 1) if inp is not None else max(1, len(hashes) * per_block + per_block // 2)
    out = tokens.get("output")
    out = out if isinstance(out, int) and out > 0 else obj.get("max_tokens")
    out = _int(out, "tokens.output", 1) if isinstance(out, int) and out > 0 else 0  # 0: unknown
    n_blocks = min(len(hashes), inp // per_block)  # the synthetic prompt never outgrows the recorded length
    status = obj.get("status")
    ok = status == 200 and not obj.get("error_type")
    stream = obj.get("stream")
    return TraceRequest(line=line, t=t, input_tokens=inp, output_tokens=out,
                        model=obj["model"] if isinstance(obj.get("model"), str) and obj["model"] else None,
                        stream=stream if isinstance(stream, bool) else None,
                        blocks=tuple((h, per_block) for h in hashes[:n_blocks]), ok=ok,
                        duration_s=_opt_float(obj.get("duration_s")) if ok else None,
                        ttft_s=_opt_float(obj.get("ttft_s")) if ok and stream is True else None)


def parse_mooncake(obj: dict, line: int) -> TraceRequest:
    """A Mooncake trace line as a TraceRequest; ValueError when unusable."""
    t = _int(obj.get("timestamp"), "timestamp") / 1000.0
    inp = _int(obj.get("input_length"), "input_length", 1)
    out = _int(obj.get("output_length"), "output_length", 1)
    ids = obj.get("hash_ids") or []
    if not isinstance(ids, list) or not all(isinstance(h, int | str) and not isinstance(h, bool) for h in ids):
        raise ValueError("hash_ids must be a list of block ids")
    blocks, left = [], inp
    for h in ids:  # the last block of a prompt is usually partial
        if left <= 0:
            break
        blocks.append((f"m{h}", min(MOONCAKE_BLOCK_TOKENS, left)))
        left -= MOONCAKE_BLOCK_TOKENS
    return TraceRequest(line=line, t=t, input_tokens=inp, output_tokens=out, blocks=tuple(blocks))


_AZURE_TIME = re.compile(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?:\.(\d+))?\s*(Z|[+-]\d\d:?\d\d)?")


def _azure_time(value: str) -> float:
    """`2023-11-16 18:15:46.6805900` (the 2023 traces: 7 digits, UTC) or `2024-05-10 00:00:00.009930+00:00`."""
    m = _AZURE_TIME.fullmatch((value or "").strip())
    if not m:
        raise ValueError(f"TIMESTAMP {value[:40]!r} is not a date and time")
    head, frac, tz = m.groups()
    ts = datetime.fromisoformat(head.replace("T", " ") + ("+00:00" if tz in (None, "Z") else tz))
    return ts.timestamp() + (float("0." + frac) if frac else 0.0)


def _past(trace: Trace, req: TraceRequest, stop_after: float | None) -> bool:
    """Keep `req`; True (and noted) once the trace has run `stop_after` seconds past its first request."""
    trace.requests.append(req)
    trace.first_t = req.t if trace.first_t is None else min(trace.first_t, req.t)
    if stop_after is not None and req.t - trace.first_t > stop_after:
        where = f"{req.source}:{req.line}" if req.source else f"line {req.line}"
        trace.stopped = f"the trace was read up to {where} ({req.t - trace.first_t:.0f} s in), past what can be replayed"
        return True
    return False


def _read_json_lines(trace: Trace, path: Path, parse, stop_after: float | None, source: str) -> None:
    for n, raw in enumerate(_lines(path, trace), 1):
        if not raw.strip():
            continue
        trace.lines += 1
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            req = parse(obj, n)
        except (ValueError, TypeError, OverflowError) as exc:
            trace.skip(source, n, str(exc)[:120] or exc.__class__.__name__)
            continue
        if _past(trace, replace(req, source=source) if source else req, stop_after):
            return


def _read_azure(trace: Trace, path: Path, stop_after: float | None, source: str) -> None:
    lines = _lines(path, trace)
    header = next(lines, "")
    names = next(csv.reader(io.StringIO(header)), [])
    need = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    if not all(k in names for k in need):
        raise TraceError(f"{path}: an Azure trace needs the columns {', '.join(need)} (header: {header.strip()[:80]})")
    for n, row in enumerate(csv.reader(lines), 2):
        if not row or not any(c.strip() for c in row):
            continue
        trace.lines += 1
        try:
            if len(row) != len(names):
                raise ValueError(f"{len(row)} fields, the header has {len(names)}")
            rec = dict(zip(names, row, strict=True))
            req = TraceRequest(line=n, t=_azure_time(rec["TIMESTAMP"]),
                               input_tokens=_int(int(rec["ContextTokens"]), "ContextTokens", 1),
                               output_tokens=_int(int(rec["GeneratedTokens"]), "GeneratedTokens", 1), source=source)
        except (ValueError, TypeError, OverflowError) as exc:
            trace.skip(source, n, str(exc)[:120])
            continue
        if _past(trace, req, stop_after):
            return


def read(path: str | Path, fmt: str | None = None, stop_after: float | None = None) -> Trace:
    """Parse a trace file or directory. `stop_after`: stop reading once a line starts more than this many
    seconds after the first (the rest could not be replayed anyway). TraceError when nothing is usable."""
    path = Path(path)
    fmt = fmt or detect(path)
    if fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r} (one of {', '.join(FORMATS)})")
    trace = Trace(format=fmt)
    files = files_of(path)
    for f in files:
        if trace.stopped:  # the files are in time order (calls-<UTC time>): the later ones start later still
            break
        source = f.name if len(files) > 1 else ""
        if fmt == "azure":
            _read_azure(trace, f, stop_after, source)
        else:
            _read_json_lines(trace, f, parse_opskit if fmt == "opskit" else parse_mooncake, stop_after, source)
    if not trace.requests:
        why = f"; first: line {trace.skipped[0][1]}: {trace.skipped[0][2]}" if trace.skipped else ""
        raise TraceError(f"{path}: no usable {fmt} trace line ({trace.lines} lines, "
                         f"{trace.skipped_count} malformed{why})")
    trace.requests.sort(key=lambda r: r.t)
    return trace
