"""How long `opskit calllog stats` takes on a day of call logs: one million lines.

Writes a synthetic call log (24 hourly files of format-1 records, gzip-compressed as the exporter
leaves them, with a few malformed lines), then times the command as a user runs it (a subprocess,
imports included) and, in this process, the phases (load: read + parse; summarize: pandas).

    .venv/bin/python bench/calllog_stats.py [--lines 1000000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("deepseek-chat", "deepseek-reasoner", "qwen-72b", "llama-3-70b")
ERRORS = ("rate_limited", "server_error", "timeout", "stream_broken")
HASHES = [f"{i:016x}" for i in range(32)]


def write_log(directory: Path, lines: int, seed: int = 1) -> tuple[int, int]:
    """24 hourly gzip files holding `lines` records in all (plus 3 malformed lines); (compressed bytes,
    uncompressed bytes)."""
    rng = random.Random(seed)
    per_hour = lines // 24
    total = plain = 0
    for h in range(24):
        out = []
        n = per_hour if h < 23 else lines - 23 * per_hour
        for i in range(n):
            err = rng.choice(ERRORS) if rng.random() < 0.02 else None
            stream = rng.random() < 0.7
            dur = rng.lognormvariate(0.5, 0.8)
            out.append(json.dumps({
                "v": 1, "ts": f"2026-12-01T{h:02d}:{i * 3600 // n // 60:02d}:{i * 3600 // n % 60:02d}"
                              f".{rng.randrange(1000):03d}Z",
                "target": "https://api.example.com", "model": rng.choice(MODELS), "stream": stream,
                "status": 200 if err is None else 500, "error_type": err, "duration_s": round(dur, 6),
                "ttft_s": round(dur * 0.1, 6) if stream and err is None else None, "tpot_s": None,
                "tokens": {"input": rng.randrange(50, 4000), "cached_input": rng.randrange(0, 50),
                           "output": rng.randrange(1, 800), "reasoning": 0},
                "tokens_from_usage": True, "max_tokens": 1024, "request_id": f"req-{h}-{i}",
                "caller": "4f946c02ab2be91b", "prompt_chars": 1200, "prefix_block_chars": 256,
                "prefix_hashes": HASHES[:rng.randrange(0, 33)],  # prompts of 0-8k characters
            }, separators=(",", ":")))
        if h == 12:
            out[100:100] = ["{not json", "[1, 2]", '{"v": 1, "ts": "yesterday"}']
        text = ("\n".join(out) + "\n").encode()
        plain += len(text)
        data = gzip.compress(text, 6)
        (directory / f"calls-20261201T{h:02d}0000Z.jsonl.gz").write_bytes(data)
        total += data.__len__()
    return total, plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        size, plain = write_log(d, args.lines)
        print(f"call log: {args.lines:,} lines ({plain / args.lines:.0f} bytes on average) in 24 gzip files, "
              f"{size / 1e6:.0f} MB compressed, {plain / 1e6:.0f} MB plain (written in {time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = subprocess.run([sys.executable, "-m", "opskit", "calllog", "stats", str(d)], capture_output=True,
                             text=True, check=True)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
        print("\n".join(res.stdout.splitlines()[:3]))
        print(f"opskit calllog stats (subprocess, imports included): {wall:.2f} s wall, {cpu:.2f} s CPU "
              f"(on a shared machine CPU is the steadier figure), {args.lines / wall / 1e3:.0f}k lines/s")
        from opskit.sidecar import call_log_stats

        t0 = time.perf_counter()
        call_log_stats.load([d], jobs=1)
        t1 = time.perf_counter()
        loaded = call_log_stats.load([d], jobs=0)
        t2 = time.perf_counter()
        call_log_stats.summarize(loaded)
        t3 = time.perf_counter()
        print(f"  in-process phases: load (gunzip + parse) {t1 - t0:.2f} s in one process, {t2 - t1:.2f} s "
              f"with one process per CPU ({os.cpu_count()}); summarize (pandas) {t3 - t2:.2f} s")


if __name__ == "__main__":
    main()
