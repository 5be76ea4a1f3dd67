"""Instructions and simulated cache misses of the metering proxy, per request and per relayed event:
counts that do not move with the machine's noise (valgrind's cachegrind on the real proxy process).

CPU time per chunk or per request (bench/proxy_overhead.py) is what the issue's targets are about, but
on a shared 2-core VM it moves by +-10 % from run to run, more than most single changes are worth.
This script runs the real `opskit exporter --proxy-listen` under cachegrind in front of `opskit mock`,
drives a fixed number of calls through it with proxy_overhead's client, and subtracts a run that
serves none (start-up and shut-down). The proxy as of a git revision (--compare, a temporary worktree)
is measured the same way, so a change's effect is read in instructions, not in noise.

What it shows beyond CPU time: how much of the proxy's cost is instructions and how much is waiting on
caches. cachegrind simulates a first-level instruction and data cache (I1, D1); an interpreter that
wakes for each read touches much code once, and each miss costs ~10-40 cycles on top.

Usage: python bench/proxy_instructions.py [--requests 1600] [--streams 200] [--compare REV]
Needs valgrind (apt-get install valgrind; without it the script says so and measures nothing); the proxy
runs ~50x slower under it: about a minute a side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import proxy_overhead as po  # noqa: E402

COUNTERS = ("I refs", "I1 misses", "D1 misses")


def cachegrind(cwd: Path, upstream: str, tmp: Path, kind: str, calls: int, tokens: int) -> dict[str, int]:
    """The proxy process's counts after serving `calls` calls of `kind` (short / streams)."""
    ready = tmp / f"ready-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(["valgrind", "--tool=cachegrind", "--cache-sim=yes", "--cachegrind-out-file=/dev/null",
                             sys.executable, "-m", "opskit", "exporter", "--listen", "127.0.0.1:0", "--no-gpu",
                             "--metrics-linger-s", "0", "--proxy-listen", "127.0.0.1:0", "--upstream", upstream,
                             "--ready-file", str(ready)], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"the proxy did not start under valgrind: {proc.stderr.read().decode()[-300:]}")
        time.sleep(0.5)
    url = json.loads(ready.read_text())["proxy_url"] + "/v1/chat/completions"
    if calls:
        out = asyncio.run(_drive(url, kind, calls, tokens))
        if out["errors"] or out["requests"] != calls:
            proc.kill()
            sys.exit(f"{out['errors']} of {calls} calls failed through the proxy under valgrind")
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=600)[1].decode()
    counts = {}
    for name in COUNTERS:
        m = re.search(name.replace(" ", r"\s+") + r":\s+([\d,]+)", err)
        if m is None:
            sys.exit(f"no '{name}' in valgrind's summary: {err[-300:]}")
        counts[name] = int(m.group(1).replace(",", ""))
    return counts


async def _drive(url: str, kind: str, calls: int, tokens: int) -> dict:
    body = po.call_body(kind == "streams", tokens)
    out = {"overhead": [], "events": 0, "requests": 0, "errors": 0}
    call = po.one_stream if kind == "streams" else po.one_short
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def worker(n: int) -> None:
            for _ in range(n):
                await call(session, url, body, out)
        workers = 8
        await asyncio.gather(*(worker(calls // workers + (i < calls % workers)) for i in range(workers)))
    return out


def measure(cwd: Path, mock: dict, tmp: Path, args) -> dict[str, dict[str, float]]:
    """Per request, per 10- and 40-token streamed call, per event (the difference of the two)."""
    po.admin(mock["admin_url"], "latency", {"ttft_ms": 0, "ttft_jitter_ms": 0, "itl_ms": 0})
    idle = cachegrind(cwd, mock["url"], tmp, "short", 0, 4)
    short = cachegrind(cwd, mock["url"], tmp, "short", args.requests, 4)
    # 25 ms between tokens: the proxy, ~50x slower under valgrind, still gets one event a read (a faster
    # stream has it read several at once, as at saturation, and how many varies from run to run)
    po.admin(mock["admin_url"], "latency", {"ttft_ms": 5, "ttft_jitter_ms": 0, "itl_ms": 25, "itl_jitter_ms": 0,
                                            "output_tokens_spread": 0, "capacity": 100000})
    streamed = {}
    for tokens in (10, 40):
        po.admin(mock["admin_url"], "latency", {"output_tokens_mean": tokens})
        streamed[tokens] = cachegrind(cwd, mock["url"], tmp, "streams", args.streams, tokens)
    per = {"request": {k: (short[k] - idle[k]) / args.requests for k in COUNTERS},
           "streamed call (40 tokens)": {k: (streamed[40][k] - idle[k]) / args.streams for k in COUNTERS}}
    # each token is one event; the role, usage and [DONE] events are there at either length
    per["event"] = {k: (streamed[40][k] - streamed[10][k]) / (args.streams * 30) for k in COUNTERS}
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1600, help="non-streamed calls")
    ap.add_argument("--streams", type=int, default=200, help="streamed calls of 10 and of 40 tokens")
    ap.add_argument("--compare", metavar="REV", help="also measure the proxy as of git revision REV")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:  # (an optional tool: `make bench` goes on without these counts)
        print("valgrind not found (apt-get install valgrind): no instruction counts", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        mock_p, mock = po.spawn([sys.executable, "-m", "opskit", "mock", "--listen", "127.0.0.1:0", "--ready-file",
                                 str(tmp / "mock.json")], None, tmp / "mock.json")
        sides = {"opskit": ROOT}
        try:
            if args.compare:
                why = po.add_worktree(args.compare, tmp / "rev")
                if why is not None:
                    sys.exit(f"--compare {args.compare}: {why}")
                sides["opskit@" + args.compare] = tmp / "rev"
            results = {side: measure(cwd, mock, tmp, args) for side, cwd in sides.items()}
        finally:
            mock_p.send_signal(signal.SIGTERM)
            mock_p.wait(30)
            if args.compare:
                po.remove_worktree(tmp / "rev")
    print(f"{args.requests} non-streamed calls, {args.streams} streamed calls of 10 and of 40 tokens; "
          "cachegrind's counts in the proxy process, its start and stop subtracted.\n")
    print("| per | side | instructions | I1 misses | D1 misses |\n|---|---|---|---|---|")
    for unit in ("request", "streamed call (40 tokens)", "event"):
        for side, per in results.items():
            c = per[unit]
            print(f"| {unit} | {side} | {c['I refs']:,.0f} | {c['I1 misses']:,.0f} | {c['D1 misses']:,.0f} |")


if __name__ == "__main__":
    main()
