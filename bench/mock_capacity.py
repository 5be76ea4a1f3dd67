"""How much one `opskit mock` process sustains: non-streamed req/s, and concurrent streams at 20 tokens/s.

    .venv/bin/python bench/mock_capacity.py            # both parts, about a minute
    .venv/bin/python bench/mock_capacity.py --part rps --seconds 5 --runs 3
    .venv/bin/python bench/mock_capacity.py --part streams --levels 250,500,1000

The server runs on core 0 and the client on core 1 (taskset). Part 1 drives POST
/v1/chat/completions (zero latency model, 16 output tokens) with `wrk` when it is installed
(Debian's `wrk`), else with an aiohttp client pool in a subprocess, and prints the median req/s and
the server's CPU time per request (from /proc/PID/stat). Part 2 holds N streams at ITL 50 ms (no
jitter configured), each --stream-tokens long (64: 3.2 s; a finished stream is replaced at once, so
the server also pays for request turnover, on keep-alive connections as SDK pools use; 0 = streams
that never end), with a raw
uvloop client that timestamps every text chunk as it is read, and prints
the p50/p99 of (gap - 50 ms), i.e. the inter-token jitter the server adds, per N; the capacity is the
largest N whose p99 stays under 5 ms. Beside it, the server's own view (`GET /admin/lateness`: how
late each chunk left vs. its deadline) separates the server's delays from the client's and from
other processes on a shared machine, and /proc/PID/schedstat says how long the server was runnable
but waiting for its core (other work on core 0). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"model": "deepseek-chat", "messages": [{"role": "user", "content": "Benchmark me."}]})
ITL_S = 0.050


def pin(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def start_mock(*flags: str) -> tuple[subprocess.Popen, dict]:
    ready = Path(tempfile.mkdtemp()) / "ready.json"
    proc = subprocess.Popen([*pin(0), sys.executable, "-m", "opskit", "mock", "--listen", "127.0.0.1:0",
                             "--ready-file", str(ready), *flags], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not (ready.exists() and ready.stat().st_size):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("mock did not start")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_wait_s(pid: int) -> float:
    """Seconds the process has spent runnable but not running (others held its core): /proc/PID/schedstat."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def counters(info: dict) -> dict:
    with urllib.request.urlopen(info["admin_url"] + "/admin/counters", timeout=10) as resp:
        return json.loads(resp.read())


# ---------------------------------------------------------------- part 1: non-streamed req/s

def _wrk(url: str, seconds: float, conns: int) -> float:
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(BODY)}\n")
    proc = subprocess.run([*pin(1), "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "-s", str(script),
                           url], capture_output=True, text=True, timeout=seconds + 30)
    for line in proc.stdout.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise SystemExit(f"wrk failed: {(proc.stderr or proc.stdout).strip()[:300]}")


async def _pool(url: str, seconds: float, conns: int) -> int:
    import aiohttp
    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as session:
        async def worker():
            nonlocal done
            while time.monotonic() < stop:
                async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    done += r.status == 200
        await asyncio.gather(*(worker() for _ in range(conns)))
    return done


def run_rps(seconds: float, runs: int, conns: int) -> None:
    proc, info = start_mock("--ttft-ms", "0", "--ttft-jitter-ms", "0", "--itl-ms", "0", "--itl-jitter-ms", "0",
                            "--output-tokens-mean", "16", "--output-tokens-spread", "0", "--capacity", "100000")
    url = info["url"] + "/v1/chat/completions"
    # A Python client saturates its own core below the server's rate: the figure is then a floor.
    tool = "wrk" if shutil.which("wrk") else "aiohttp pool (client-bound; apt-get install wrk for the ceiling)"
    rates, cpu_per, waits = [], [], []
    try:
        for _ in range(runs):
            before_cpu, before_n = cpu_seconds(proc.pid), counters(info)["requests"].get("200", 0)
            before_wait, t0 = runqueue_wait_s(proc.pid), time.monotonic()
            if tool == "wrk":
                rate = _wrk(url, seconds, conns)
            else:
                out = subprocess.run([*pin(1), sys.executable, __file__, "--pool-client", url, str(seconds),
                                      str(conns)], capture_output=True, text=True, timeout=seconds + 60)
                rate = int(out.stdout.strip()) / seconds
            n = counters(info)["requests"].get("200", 0) - before_n
            rates.append(rate)
            cpu_per.append((cpu_seconds(proc.pid) - before_cpu) / max(n, 1))
            waits.append((runqueue_wait_s(proc.pid) - before_wait) / (time.monotonic() - t0))
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"non-streamed: {statistics.median(rates):,.0f} req/s median of {runs} x {seconds:g} s "
          f"({', '.join(f'{r:,.0f}' for r in rates)}), client {tool} with {conns} connections; "
          f"server CPU {statistics.median(cpu_per) * 1e6:,.0f} us/request, waiting for its core "
          f"{statistics.median(waits):.0%} of the time")


# ---------------------------------------------------------------- part 2: streams at 20 tokens/s

TEXT_MARK = b'{"content":" '   # a text chunk's delta (synthetic words start with a space); not role/finish


class _StreamProto(asyncio.Protocol):
    """One keep-alive connection that streams request after request, as SDK connection pools do.

    Times every text chunk as it is read (`times` holds one list per stream); after `[DONE]` and the
    end of the chunked body it sends the next request on the same connection.
    """

    def __init__(self, request: bytes) -> None:
        self.request, self.tail, self.streams, self.finishing = request, b"", [[]], False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        data = self.tail + data
        # the tail is one byte shorter than the mark: no match is counted twice
        self.streams[-1].extend([now] * data.count(TEXT_MARK))
        self.tail = data[-(len(TEXT_MARK) - 1):]
        self.finishing = self.finishing or b"data: [DONE]" in data
        if self.finishing and b"\r\n0\r\n\r\n" in data:   # the chunked body ended: next request
            self.finishing, self.tail = False, b""
            self.streams.append([])
            self.transport.write(self.request)


def _reset_lateness(admin_url: str) -> None:
    """Start the server's lateness histogram where the client starts measuring (after the ramp-up)."""
    req = urllib.request.Request(admin_url + "/admin/reset", method="POST", data=b"")
    urllib.request.urlopen(req, timeout=10).close()


async def _hold_streams(host: str, port: int, n: int, hold_s: float, admin_url: str) -> list[float]:
    """Keep n streams going (a finished one is followed at once by the next on its connection); return
    the gaps between consecutive text chunks of a stream, minus the ITL, in ms."""
    loop = asyncio.get_running_loop()
    body = json.dumps({"model": "deepseek-chat", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    raw = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    protos: list[_StreamProto] = []
    for _ in range(n):   # spread the openings over one ITL so ticks do not all coincide
        _, proto = await loop.create_connection(lambda: _StreamProto(raw), host, port)
        protos.append(proto)
        await asyncio.sleep(ITL_S / n)
    await asyncio.sleep(1.0)                     # let the openings settle
    await loop.run_in_executor(None, _reset_lateness, admin_url)
    mark = time.perf_counter()
    await asyncio.sleep(hold_s)
    for proto in protos:
        proto.transport.close()
    gaps = []
    for t in (t for proto in protos for t in proto.streams):
        gaps += [(b - a - ITL_S) * 1000 for a, b in zip(t, t[1:], strict=False) if a >= mark]
    return gaps


def run_streams(levels: list[int], hold_s: float, tokens: int) -> None:
    each = f"{tokens} tokens each, replaced as they end" if tokens else "never ending"
    print(f"streams at 20 tokens/s (ITL 50 ms, no configured jitter; {each}), held {hold_s:g} s each:")
    best = 0
    for n in levels:
        proc, info = start_mock("--ttft-ms", "10", "--ttft-jitter-ms", "0", "--itl-ms", "50", "--itl-jitter-ms",
                                "0", "--output-tokens-mean", str(tokens or 10_000_000), "--output-tokens-spread", "0",
                                "--capacity", "100000")
        try:
            host, port = info["url"].removeprefix("http://").split(":")
            cpu0, chunks0 = cpu_seconds(proc.pid), counters(info)["tokens"]["output"]
            wait0 = runqueue_wait_s(proc.pid)
            t0 = time.monotonic()
            out = subprocess.run([*pin(1), sys.executable, __file__, "--stream-client", host, port, str(n),
                                  str(hold_s), info["admin_url"]], capture_output=True, text=True, timeout=hold_s + n / 50 + 60)
            cpu_s, wall = cpu_seconds(proc.pid) - cpu0, time.monotonic() - t0
            per_chunk = cpu_s / max(1, counters(info)["tokens"]["output"] - chunks0)
            cpu = cpu_s / wall
            waited = (runqueue_wait_s(proc.pid) - wait0) / wall
            gaps = json.loads(out.stdout or "[]")
            with urllib.request.urlopen(info["admin_url"] + "/admin/lateness", timeout=10) as resp:
                late = json.loads(resp.read())
        finally:
            proc.terminate()
            proc.wait(10)
        if len(gaps) < 2:
            print(f"  N={n:5d}: no measurements ({out.stderr.strip()[-300:]})")
            continue
        q = statistics.quantiles(gaps, n=100)
        expected = n * hold_s / ITL_S * ((tokens - 1) / tokens if tokens else 1)
        print(f"  N={n:5d}: added ITL jitter p50 {q[49]:6.2f} ms  p99 {q[98]:6.2f} ms  max {max(gaps):7.2f} ms  "
              f"({len(gaps):,} gaps of ~{expected:,.0f} expected; server CPU {cpu:.0%}, {per_chunk * 1e6:.0f} us/chunk, waiting for "
              f"its core {waited:.0%} of the time; server-side lateness p99 <= {late['p99_le_ms']} ms, "
              f"max {late['max_ms']} ms)")
        if q[98] < 5.0:
            best = max(best, n)
    print(f"streams held with p99 added jitter < 5 ms: {best} (highest level tried: {max(levels)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["rps", "streams", "all"], default="all")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--levels", default="250,500,750,1000,1500")
    ap.add_argument("--hold", type=float, default=5.0)
    ap.add_argument("--stream-tokens", type=int, default=64,
                    help="output tokens per stream (a finished stream is replaced at once); 0 = never ending")
    ap.add_argument("--pool-client", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--stream-client", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.pool_client:
        url, secs, conns = a.pool_client
        print(asyncio.run(_pool(url, float(secs), int(conns))))
        return
    if a.stream_client:
        import uvloop
        host, port, n, hold, admin = a.stream_client
        print(json.dumps(uvloop.run(_hold_streams(host, int(port), int(n), float(hold), admin))))
        return
    print(f"host: {os.cpu_count()} cores; server pinned to core 0, client to core 1 ({'taskset' if pin(0) else 'no pinning'})")
    if a.part in ("rps", "all"):
        run_rps(a.seconds, a.runs, a.conns)
    if a.part in ("streams", "all"):
        run_streams([int(x) for x in a.levels.split(",")], a.hold, a.stream_tokens)


if __name__ == "__main__":
    main()
