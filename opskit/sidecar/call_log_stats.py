"""`opskit calllog stats DIR`: what a call log (opskit.sidecar.call_log, docs/call-log.md) says.

Calls, error types, tokens by type, top models, and per UTC hour the calls, errors and latency
percentiles (duration, TTFT) of successful calls, as the latency histograms count them. Reads the
`calls-*.jsonl` and `calls-*.jsonl.gz` files of DIR (or the files given). `load` -> `summarize` ->
`render`: pure computation and thin printing.

Speed: a day of logs is millions of lines, so lines are parsed in batches (one `json.loads` of a JSON
array of many lines, the C parser's speed without a Python call per line) and only the columns used
become a DataFrame; a batch with a malformed line is parsed again line by line, so a bad line costs
its batch, not the run. Lines are cut before the fields not read (prefix hashes, bodies: most of a
line) when that leaves every field read, and the cyclic garbage collector is off while parsing (millions
of short-lived dicts, no cycles). `--jobs N` reads files in N processes: on a busy 2-core machine that
gained nothing dependable (bench/README.md), since every record is sent back to the parent.
Malformed lines (not JSON, not an object, no valid `ts`) are skipped and counted, with where the first
ones are.
"""

from __future__ import annotations

import concurrent.futures
import gc
import gzip
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import click

BATCH = 5000
SHOW_BAD = 5       # malformed line locations listed in the report
TOP_MODELS = 10


@dataclass
class Loaded:
    """The usable records as columns, and what was skipped."""

    columns: dict[str, list]
    files: int = 0
    malformed: int = 0
    bad_at: list[str] = field(default_factory=list)


READ = frozenset(("ts", "model", "status", "error_type", "duration_s", "ttft_s", "tokens"))
CUT = ',"request_id":'  # in the exporter's order every field in READ comes before it
COLUMNS = ("ts", "model", "status", "error_type", "duration_s", "ttft_s", "input", "cached_input", "output",
           "reasoning")


def _files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.name.startswith("calls-")
                          and q.name.endswith((".jsonl", ".jsonl.gz")))
        else:
            out.append(p)
    return out


def _num(v):
    return v if type(v) in (int, float) and not (type(v) is float and not math.isfinite(v)) else None


def _add(cols: dict[str, list], objs: list) -> int:
    """Append the usable records of `objs` to the columns; the number that were not usable."""
    bad = 0
    ts, model, status, err, dur, ttft = (cols[c] for c in COLUMNS[:6])
    tin, tcached, tout, treason = (cols[c] for c in COLUMNS[6:])
    for o in objs:
        if type(o) is not dict or type(o.get("ts")) is not str:
            bad += 1
            continue
        ts.append(o["ts"])
        m = o.get("model")
        model.append(m if type(m) is str else "(none)")
        status.append(_num(o.get("status")))
        e = o.get("error_type")
        err.append(e if type(e) is str else "")
        dur.append(_num(o.get("duration_s")))
        ttft.append(_num(o.get("ttft_s")))
        t = o.get("tokens")
        t = t if type(t) is dict else {}
        tin.append(_num(t.get("input")))
        tcached.append(_num(t.get("cached_input")))
        tout.append(_num(t.get("output")))
        treason.append(_num(t.get("reasoning")))
    return bad


def load(paths: list[Path], jobs: int = 1) -> Loaded:
    """Every usable record of the call-log files under `paths` (directories or files); files are read
    by `jobs` processes (at most one per file; 0 = one per CPU)."""
    files = _files(paths)
    jobs = min(len(files), jobs or os.cpu_count() or 1)
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            parts = list(pool.map(load_file, files))
    else:
        parts = [load_file(f) for f in files]
    out = Loaded({c: [] for c in COLUMNS}, files=len(files))
    for part in parts:
        for c in COLUMNS:
            out.columns[c] += part.columns[c]
        out.malformed += part.malformed
        out.bad_at += part.bad_at[:SHOW_BAD - len(out.bad_at)]
    return out


def _cut(line: str) -> str:
    """The line without what follows the fields read here, in the exporter's field order (the prefix
    hashes and bodies are most of a line); `_parse` checks that the cut left every field read."""
    i = line.find(CUT)
    return line[:i] + "}" if i > 0 else line


def _parse(batch: list[str]) -> list | None:
    """The JSON values of `batch` (one per line) from one parse, or None when a line is malformed."""
    try:
        objs = json.loads("[" + ",".join(map(_cut, batch)) + "]")
    except (ValueError, RecursionError):
        return None
    if len(objs) != len(batch):  # a line holding two values
        return None
    for i, o in enumerate(objs):
        if type(o) is dict and not o.keys() >= READ:  # a field missing, or after the cut: read it whole
            try:
                objs[i] = json.loads(batch[i])
            except (ValueError, RecursionError):
                return None
    return objs


def load_file(path: Path) -> Loaded:
    """The usable records of one call-log file (.jsonl or .jsonl.gz)."""
    enabled = gc.isenabled()
    gc.disable()  # parsing makes millions of short-lived dicts and no cycle: the collector only costs (~25 %)
    try:
        return _load_file(path)
    finally:
        if enabled:
            gc.enable()


def _load_file(path: Path) -> Loaded:
    out = Loaded({c: [] for c in COLUMNS}, files=1)
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        out.malformed += 1
        out.bad_at.append(f"{path.name}: unreadable ({getattr(exc, 'strerror', None) or exc})")
        return out
    lines = raw.decode("utf-8", "replace").splitlines()
    for start in range(0, len(lines), BATCH):
        objs = _parse([ln for ln in lines[start:start + BATCH] if ln.strip()])
        if objs is not None and not _add(out.columns, objs):
            continue
        # usable ones were added (objs) or not (None): find the bad lines' numbers
        _locate(out, path, lines, start, count_only=objs is not None)
    return out


def _locate(out: Loaded, path: Path, lines: list[str], start: int, count_only: bool = False) -> None:
    """Parse one batch line by line: add its usable records (unless already added) and note the bad ones."""
    for n, line in enumerate(lines[start:start + BATCH], start + 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            obj = None
        usable = type(obj) is dict and type(obj.get("ts")) is str
        if usable and not count_only:
            _add(out.columns, [obj])
        if not usable:
            out.malformed += 1
            if len(out.bad_at) < SHOW_BAD:
                out.bad_at.append(f"{path.name}:{n}")


@dataclass
class Stats:
    """What `render` prints."""

    calls: int
    first: str
    last: str
    errors: list[tuple[str, int]]          # error type, calls
    tokens: dict[str, int]
    models: list[tuple[str, int]]          # model, calls (top ones)
    hours: list[dict]                       # per UTC hour: calls, errors, duration/ttft p50/p95/p99


def summarize(loaded: Loaded) -> Stats:
    """The figures of a loaded log (pandas); ValueError when no record has a valid time."""
    import pandas as pd

    df = pd.DataFrame(loaded.columns)
    df["ts"] = pd.to_datetime(df["ts"], format="ISO8601", utc=True, errors="coerce")
    bad_ts = int(df["ts"].isna().sum())
    loaded.malformed += bad_ts
    df = df.dropna(subset=["ts"])
    if df.empty:
        raise ValueError("no usable call-log line")
    for c in ("duration_s", "ttft_s", "input", "cached_input", "output", "reasoning", "status"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    errors = df.loc[df["error_type"] != "", "error_type"].value_counts()
    models = df["model"].value_counts().head(TOP_MODELS)
    ok = df[df["error_type"] == ""]
    hour = df["ts"].dt.floor("h")
    q = (0.5, 0.95, 0.99)
    dur = ok.groupby(hour[ok.index])["duration_s"].quantile(q).unstack()
    ttft = ok.dropna(subset=["ttft_s"]).groupby(hour[ok.index])["ttft_s"].quantile(q).unstack()
    calls = hour.value_counts().sort_index()
    errs = (df["error_type"] != "").groupby(hour).sum()
    hours = []
    for h, n in calls.items():
        row = {"hour": h.strftime("%Y-%m-%d %H:00"), "calls": int(n), "errors": int(errs.get(h, 0))}
        for name, table in (("duration", dur), ("ttft", ttft)):
            for p in q:
                row[f"{name}_p{round(p * 100)}"] = (float(table.at[h, p]) if h in table.index and p in table.columns
                                                    and pd.notna(table.at[h, p]) else None)
        hours.append(row)
    return Stats(calls=len(df), first=df["ts"].min().strftime("%Y-%m-%dT%H:%M:%SZ"),
                 last=df["ts"].max().strftime("%Y-%m-%dT%H:%M:%SZ"),
                 errors=[(str(k), int(v)) for k, v in errors.items()],
                 tokens={c: int(df[c].sum()) for c in ("input", "cached_input", "output", "reasoning")},
                 models=[(str(k), int(v)) for k, v in models.items()], hours=hours)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def render(s: Stats, loaded: Loaded) -> str:
    """The report, as text."""
    out = [f"calls: {s.calls:,} from {s.first} to {s.last} ({loaded.files} files)"]
    if loaded.malformed:
        where = ", ".join(loaded.bad_at) + (", ..." if loaded.malformed > len(loaded.bad_at) else "")
        out.append(f"malformed lines skipped: {loaded.malformed:,} ({where})")
    failed = sum(n for _, n in s.errors)
    out.append(f"errors: {failed:,} ({failed / s.calls:.2%})" + "".join(
        f"\n  {t:<18} {n:>12,}  {n / s.calls:7.2%}" for t, n in s.errors))
    out.append("tokens:" + "".join(f"\n  {t:<18} {n:>16,}" for t, n in s.tokens.items()))
    out.append("top models:" + "".join(f"\n  {m:<30} {n:>12,}  {n / s.calls:7.2%}" for m, n in s.models))
    out.append("per hour (UTC; latency of successful calls, ms):")
    out.append(f"  {'hour':<16} {'calls':>9} {'errors':>7}  {'dur p50':>8} {'p95':>7} {'p99':>7}  "
               f"{'ttft p50':>8} {'p95':>7} {'p99':>7}")
    for h in s.hours:
        out.append(f"  {h['hour']:<16} {h['calls']:>9,} {h['errors']:>7,}  {_ms(h['duration_p50']):>8} "
                   f"{_ms(h['duration_p95']):>7} {_ms(h['duration_p99']):>7}  {_ms(h['ttft_p50']):>8} "
                   f"{_ms(h['ttft_p95']):>7} {_ms(h['ttft_p99']):>7}")
    return "\n".join(out)


@click.group("calllog")
def calllog() -> None:
    """Read the call log that `opskit exporter --call-log DIR` writes."""


@calllog.command("stats")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--jobs", type=click.IntRange(min=0), default=1, show_default=True,
              help="Processes reading files in parallel (0: one per CPU).")
@click.pass_context
def stats_command(ctx: click.Context, paths: tuple[Path, ...], jobs: int) -> None:
    """Calls, error types, tokens, top models and latency percentiles per hour of a call log.

    \b
    PATHS: call-log directories (their calls-*.jsonl and calls-*.jsonl.gz files) or files.
    Examples:
      opskit calllog stats /var/log/opskit-calls
      opskit calllog stats calls-20261201T000000Z.jsonl.gz
    """
    loaded = load(list(paths), jobs)
    try:
        s = summarize(loaded)
    except ValueError:
        click.echo(f"opskit calllog stats: no usable call-log line in {', '.join(map(str, paths))} "
                   f"({loaded.files} files, {loaded.malformed} malformed lines)", err=True)
        ctx.exit(2)
    click.echo(render(s, loaded))
