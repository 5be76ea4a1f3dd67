"""What the metering proxy costs, side by side with nginx: direct calls, opskit's proxy and nginx.

Processes on loopback: `opskit mock` (the upstream), opskit's proxy (`opskit exporter --proxy-listen`,
its own process so its CPU time can be read from /proc/<pid>/stat), Debian's nginx as a reverse proxy
(one process, `master_process off`, upstream keep-alive, `proxy_buffering off` for SSE; a temporary
config, non-daemon, loopback only), a bare byte relay in Python on uvloop (bench/relay_floor.py: the
floor any Python proxy starts from, measured in the streams and short phases) and this script as the
load client. With taskset (and unless --no-pin), the proxies get core 1 and the mock and the client
share core 0. Figures are ratios to nginx measured in the same run.

- streams: N concurrent streaming calls (closed loop); runs direct / opskit / nginx, the order rotated
  each round: each proxy's CPU per relayed SSE event (its whole CPU time over the events it relayed).
- short: C concurrent non-streamed calls (mock latency ~0), rotated the same way: CPU per request.
- added TTFT, paired: N workers each start one proxied and one direct stream at the same moment, again
  and again; each side's TTFT relative to the mock's ground truth (`x-mock-ttft-ms`); added TTFT is
  proxied minus direct per pair, at p50 and p99, for opskit and for nginx in alternating rounds. Steady
  state (the target's figure): the workers' starts spread over one pair's length, each worker's first
  pair (new connections) not counted. Then one round in bursts: all N start at once and stay in step.
- compare (--compare REV): the proxy as of git revision REV (run from a temporary worktree) is one more
  side in the streams, short and TTFT phases: what a change bought, measured side by side.
- saturation (--saturation): streams at the mock's ITL 0 through opskit with 1 and with 2 proxy
  workers (`--proxy-workers 2`, given --sat-cores) and through nginx: chunks/s delivered, the scaling
  ratio, and each proxy's CPU per chunk when every read carries several events (a busy server).

Without nginx (`apt-get install nginx-light`) the nginx columns are left out. Medians over rounds are
printed with the spread (min-max) and the machine's load average.

Usage: python bench/proxy_overhead.py [--streams 200] [--ttft-streams 50] [--ttft-tokens 10] [--seconds 5] [--rounds 3]
       [--saturation] [--compare REV] [--no-pin] [--write-readme]
Targets: <= 1.5x nginx's CPU per chunk at 200 streams, <= 2.5x per non-streamed request, added TTFT
p99 <= nginx's + 1 ms at 50 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from opskit.core.sse import SSEParser  # noqa: E402
from opskit.core.stream_meter import StreamMeter  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
README = ROOT / "bench" / "README.md"


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, from /proc (the process's own accounting): its own code (an
    interpreter's, for opskit) and the kernel's work for it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def runqueue_wait_s(pid: int) -> float:
    """Seconds the process spent runnable but not running (others held the core): /proc/PID/schedstat."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def spawn(args: list[str], core: int | None, ready: Path, cwd: Path = ROOT) -> tuple[subprocess.Popen, dict]:
    """Start a process (pinned to `core` when taskset exists) and wait for its ready file. `python -m
    opskit` runs the opskit of `cwd` (the current directory comes first on the module path)."""
    prefix = ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []
    proc = subprocess.Popen(prefix + args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ready.exists() and ready.stat().st_size:
            return proc, json.loads(ready.read_text())
        if proc.poll() is not None:
            sys.exit(f"{args[:4]} exited: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.05)
    proc.kill()
    sys.exit(f"{args[:4]} not ready in 30 s")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def one_stream(session, url: str, body: bytes, out: dict) -> None:
    """One streamed call: TTFT from a full parse up to the first text event, then only counting,
    so that the client spends little CPU on the core it shares with the mock."""
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        meter, parser, events, last = StreamMeter(t0), SSEParser(), 0, b""
        async for chunk in r.content.iter_any():
            if meter.first_token is None:
                now = time.perf_counter()
                for payload in parser.feed(chunk):
                    meter.on_data(payload, now)
            events += chunk.count(b"data:")
            last = chunk
        truth = r.headers.get("x-mock-ttft-ms")
        if r.status != 200 or not last.rstrip().endswith(b"[DONE]") or meter.ttft is None or truth is None:
            out["errors"] += 1
            return None
        out["overhead"].append(meter.ttft - float(truth) / 1000)
        out["events"] += events
        out["requests"] += 1
        return out["overhead"][-1]


async def one_short(session, url: str, body: bytes, out: dict) -> None:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        await r.read()
        out["requests" if r.status == 200 else "errors"] += 1


def call_body(stream: bool, tokens: int) -> bytes:
    """The request body of every call the bench makes."""
    return json.dumps({"model": "deepseek-chat", "messages": [{"role": "user", "content": "bench"}],
                       "max_tokens": tokens, "stream": stream, "seed": 1,
                       **({"stream_options": {"include_usage": True}} if stream else {})}).encode()


def add_worktree(rev: str, path: Path) -> str | None:
    """A temporary git worktree of this repository at `rev` (for --compare); the reason when there is none."""
    added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
                           capture_output=True, text=True)
    return (added.stderr.strip().splitlines() or ["git failed"])[-1] if added.returncode else None


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)


async def load(base: str, kind: str, concurrency: int, seconds: float, tokens: int) -> dict:
    """Closed-loop load for `seconds`; returns counts, TTFT overheads and elapsed time."""
    stream = kind == "streams"
    body = call_body(stream, tokens)
    out = {"overhead": [], "events": 0, "requests": 0, "errors": 0}
    call = one_stream if stream else one_short
    url = base + "/v1/chat/completions"
    stop_at = time.perf_counter() + seconds

    async def worker(session) -> None:
        while time.perf_counter() < stop_at:
            try:
                await call(session, url, body, out)
            except aiohttp.ClientError:
                out["errors"] += 1

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        out["elapsed"] = time.perf_counter() - t0
    return out


async def paired(proxy_url: str, mock_url: str, streams: int, seconds: float, tokens: int,
                 period: float | None = None) -> list[float]:
    """`streams` workers, each starting one proxied and one direct stream at the same moment, again
    and again: the proxy holds `streams` streams while the mock's own lateness hits both sides of each
    pair alike. Returns, per pair, proxied minus direct TTFT (each relative to the mock's truth).

    With `period` (a pair's expected length), steady state: worker i starts i/streams of a period late,
    so streams begin spread out as independent callers' do, and each worker's first pair (its new
    connections) is not counted. Without it, bursts: all start at once and stay in step, first pairs
    counted (every pair of a wave queues behind the others, and the round's connection set-up with them)."""
    body = json.dumps({"model": "deepseek-chat", "messages": [{"role": "user", "content": "bench"}],
                       "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}).encode()
    sides = {"proxy": {"overhead": [], "events": 0, "requests": 0, "errors": 0},
             "direct": {"overhead": [], "events": 0, "requests": 0, "errors": 0}}
    diffs: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(session, i: int) -> None:
        if period is not None:
            await asyncio.sleep(period * i / streams)
        first = period is not None
        while time.perf_counter() < stop_at:
            a, b = await asyncio.gather(
                one_stream(session, proxy_url + "/v1/chat/completions", body, sides["proxy"]),
                one_stream(session, mock_url + "/v1/chat/completions", body, sides["direct"]),
                return_exceptions=True)
            if isinstance(a, float) and isinstance(b, float) and not first:
                diffs.append(a - b)
            first = False

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(worker(session, i) for i in range(streams)))
    return diffs


def admin(admin_url: str, section: str, changes: dict) -> None:
    import urllib.request
    req = urllib.request.Request(f"{admin_url}/admin/{section}", data=json.dumps(changes).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


NGINX_CONF = """daemon off; master_process off; worker_processes 1; pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream mock {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 100000;
    location / {{
      proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering off;
    }}
  }}
}}
"""


def start_proxy(upstream: str, ready: Path, core: int | None, workers: int = 1,
                cwd: Path = ROOT) -> tuple[subprocess.Popen, dict]:
    """opskit's exporter with its metering proxy in front of `upstream` (its code: that of `cwd`)."""
    return spawn([sys.executable, "-m", "opskit", "exporter", "--listen", "127.0.0.1:0", "--no-gpu",
                  "--metrics-linger-s", "0", "--proxy-listen", "127.0.0.1:0", "--upstream", upstream,
                  "--proxy-workers", str(workers), "--ready-file", str(ready)], core, ready, cwd)


def start_nginx(tmp: str, upstream_url: str, core: int | None) -> tuple[subprocess.Popen, dict] | None:
    """Debian's nginx as a one-process reverse proxy to the mock, or None where it is not installed."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        return None
    from opskit.core.processes import free_port

    port = free_port()
    conf = Path(tmp, "nginx.conf")
    conf.write_text(NGINX_CONF.format(tmp=tmp, upstream_port=upstream_url.rsplit(":", 1)[1], port=port))
    prefix = ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []
    proc = subprocess.Popen(prefix + [binary, "-e", f"{tmp}/nginx-error.log", "-p", tmp, "-c", str(conf)], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"nginx exited: {proc.stderr.read().decode()[-500:]}")
        try:
            import urllib.request
            urllib.request.urlopen(url + "/admin/counters", timeout=1)  # proxied to the mock's API port: 404 is fine
            break
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "code", None):
                break
            time.sleep(0.05)
    return proc, {"url": url, "pid": proc.pid}


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children (the exporter and its proxy workers)."""
    return sum(tree_cpu_split(pid))


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its live children."""
    user, system = cpu_split(pid)
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError, IndexError):
                u, k = cpu_split(int(child))
                user, system = user + u, system + k
    return user, system


def run_phase(kind: str, args, sides: dict[str, dict]) -> dict[str, list[dict]]:
    """Runs of each side (direct, opskit, nginx), the order rotated each round; per-run figures."""
    concurrency = args.streams if kind == "streams" else args.short_concurrency
    tokens = args.tokens if kind == "streams" else 4
    names = list(sides)
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(args.rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            side = sides[name]
            pid = side.get("pid")
            cpu0 = tree_cpu_split(pid) if pid else (0.0, 0.0)
            wait0 = runqueue_wait_s(pid) if pid else 0.0
            res = asyncio.run(load(side["url"], kind, concurrency, args.seconds, tokens))
            cpu1 = tree_cpu_split(pid) if pid else (0.0, 0.0)
            res["user_s"], res["cpu_s"] = cpu1[0] - cpu0[0], sum(cpu1) - sum(cpu0)
            res["wait_s"] = runqueue_wait_s(pid) - wait0 if pid else 0.0
            rounds[name].append(res)
    return rounds


def ttft_phase(args, sides: dict[str, dict]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Paired added TTFT of each proxy, in alternating rounds: steady state (the target's figure), then
    one round in bursts."""
    names = [n for n in sides if n not in ("direct", "floor")]
    steady: dict[str, list[float]] = {n: [] for n in names}
    bursts: dict[str, list[float]] = {n: [] for n in names}
    period = 0.05 + args.ttft_tokens * args.itl_ms / 1000  # the mock's TTFT, then one event per ITL
    for i in range(args.rounds + 1):
        for name in (names if i % 2 == 0 else names[::-1]):
            out = steady if i < args.rounds else bursts
            out[name] += asyncio.run(paired(sides[name]["url"], sides["direct"]["url"], args.ttft_streams,
                                            args.seconds, args.ttft_tokens, period if i < args.rounds else None))
    return steady, bursts


def python_per_chunk_us(n: int = 50_000, woken: int = 3_000) -> tuple[float, float, float]:
    """The proxy's own Python work per SSE chunk, in-process with no I/O (200 streams in turn): chunked
    decoding, framing for the client, metering; back to back with and without metering, and with
    metering when the thread slept 0.2 ms before each chunk, as a proxy does between events at moderate
    load (the same work then runs with cold caches). What is left of the CPU per chunk measured on the
    real process is the event loop's wake-up, recv and send."""

    from opskit.sidecar.metering import MeteredCall
    from opskit.sidecar.proxy import _sink
    from opskit.sidecar.upstream_client import Pool
    from opskit.sidecar.upstream_protocol import Conn

    class Null:
        def write(self, data): pass
        def is_closing(self): return False
        def get_write_buffer_size(self): return 0

    event = (b'data: {"id":"mock-1","object":"chat.completion.chunk","created":1795306732,"model":'
             b'"deepseek-chat","choices":[{"index":0,"delta":{"content":" while"},"logprobs":null,'
             b'"finish_reason":null}]}\n\n')
    framed = b"%x\r\n%b\r\n" % (len(event), event)

    def streams(metered: bool) -> list[Conn]:
        conns = []
        for _ in range(200):
            conn = Conn(Pool("http://127.0.0.1:1", 1, 5))
            conn.connection_made(Null())
            ex = conn.send("POST", b"")
            conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n")
            call = MeteredCall(time.perf_counter())
            call.begin(200, {"content-type": "text/event-stream"})
            ex.sink, ex.whole = _sink(Null(), True, call.feed if metered else None, ex)
            conns.append(conn)
        return conns

    async def run() -> tuple[float, float, float]:
        out = []
        for metered in (True, False):
            conns = streams(metered)
            t0 = time.process_time()
            for i in range(n):
                conns[i % 200].data_received(framed)
            out.append((time.process_time() - t0) / n * 1e6)
        conns, clock = streams(True), time.thread_time_ns
        overhead = -clock() + clock()  # (the two clock reads, taken off each sample)
        total = 0
        for i in range(woken):
            time.sleep(0.0002)
            t0 = clock()
            conns[i % 200].data_received(framed)
            total += clock() - t0 - overhead
        out.append(total / woken / 1e3)
        return out[0], out[1], out[2]
    return asyncio.run(run())


def med_spread(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def summarize(streams: dict, short: dict, diffs: dict, bursts: dict) -> dict[str, dict]:
    """Per side: CPU per chunk and per request (median, min, max over rounds), throughput, added TTFT."""
    out: dict[str, dict] = {}
    for name in streams:
        f = out[name] = {}
        f["chunks_per_s"] = med_spread([r["events"] / r["elapsed"] for r in streams[name]])
        f["rps"] = med_spread([r["requests"] / r["elapsed"] for r in short[name]])
        f["errors"] = sum(r["errors"] for r in streams[name] + short[name])
        if name == "direct":
            continue
        f["cpu_chunk_us"] = med_spread([r["cpu_s"] / max(1, r["events"]) * 1e6 for r in streams[name]])
        f["cpu_request_us"] = med_spread([r["cpu_s"] / max(1, r["requests"] + r["errors"]) * 1e6 for r in short[name]])
        f["user_chunk_us"] = statistics.median([r["user_s"] / max(1, r["events"]) * 1e6 for r in streams[name]])
        f["user_request_us"] = statistics.median([r["user_s"] / max(1, r["requests"] + r["errors"]) * 1e6
                                                  for r in short[name]])
        f["wait_share_short"] = statistics.median([r["wait_s"] / r["elapsed"] for r in short[name]])
        d = diffs.get(name, [])
        f["ttft_p50_ms"], f["ttft_p99_ms"], f["pairs"] = pct(d, .5) * 1e3, pct(d, .99) * 1e3, len(d)
        b = bursts.get(name, [])
        f["burst_p50_ms"], f["burst_p99_ms"], f["burst_pairs"] = pct(b, .5) * 1e3, pct(b, .99) * 1e3, len(b)
    return out


def fmt3(t: tuple[float, float, float], unit: str = "", digits: int = 1) -> str:
    return f"{t[0]:.{digits}f}{unit} ({t[1]:.{digits}f}-{t[2]:.{digits}f})"


def report(f: dict[str, dict], args, pinned: bool, load: tuple[float, float], sat: dict | None) -> str:
    ok = {True: "ok", False: "MISSED"}
    o, n = f["opskit"], f.get("nginx")
    errors = ", ".join(f"{k} {x['errors']}" for k, x in f.items() if isinstance(x, dict) and "errors" in x)
    lines = [
        f"Streams: {args.streams} concurrent, {args.tokens} tokens each at the mock's itl {args.itl_ms} ms; TTFT pairs: "
        f"{args.ttft_streams} streams of {args.ttft_tokens} tokens; short: {args.short_concurrency} concurrent non-streamed; {args.rounds} rounds of "
        f"{args.seconds:g} s; pinned: {pinned}; errors: {errors}; load average (1 min) "
        f"before/after: {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} CPUs. Median (min-max over rounds).",
        "",
        "| figure | opskit | nginx | ratio opskit/nginx | target |",
        "|---|---|---|---|---|",
    ]
    if n is None:
        lines[2:] = ["| figure | opskit |", "|---|---|"]
        lines += [f"| CPU per chunk | {fmt3(o['cpu_chunk_us'], ' us')} |",
                  f"| CPU per short request | {fmt3(o['cpu_request_us'], ' us', 0)} |",
                  f"| added TTFT p50 / p99, steady | {o['ttft_p50_ms']:.2f} / {o['ttft_p99_ms']:.2f} ms |",
                  f"| added TTFT p50 / p99, bursts | {o['burst_p50_ms']:.2f} / {o['burst_p99_ms']:.2f} ms |"]
    else:
        rc, rr = o["cpu_chunk_us"][0] / n["cpu_chunk_us"][0], o["cpu_request_us"][0] / n["cpu_request_us"][0]
        lines += [
            f"| CPU per chunk, {args.streams} streams | {fmt3(o['cpu_chunk_us'], ' us')} | "
            f"{fmt3(n['cpu_chunk_us'], ' us')} | {rc:.2f}x | <= 1.5x ({ok[rc <= 1.5]}) |",
            f"| CPU per non-streamed request | {fmt3(o['cpu_request_us'], ' us', 0)} | "
            f"{fmt3(n['cpu_request_us'], ' us', 0)} | {rr:.2f}x | <= 2.5x ({ok[rr <= 2.5]}) |",
            f"| of which user time (the process's own code; the rest is the kernel's: recv, send, epoll), chunk / "
            f"request | {o['user_chunk_us']:.1f} / {o['user_request_us']:.0f} us | {n['user_chunk_us']:.1f} / "
            f"{n['user_request_us']:.0f} us | | |",
            f"| added TTFT p50, {args.ttft_streams} streams, steady ({o['pairs']} / {n['pairs']} pairs) | "
            f"{o['ttft_p50_ms']:.2f} ms | {n['ttft_p50_ms']:.2f} ms | | |",
            f"| added TTFT p99, steady | {o['ttft_p99_ms']:.2f} ms | {n['ttft_p99_ms']:.2f} ms | "
            f"{o['ttft_p99_ms'] - n['ttft_p99_ms']:+.2f} ms | <= +1 ms ({ok[o['ttft_p99_ms'] - n['ttft_p99_ms'] <= 1]}) |",
            f"| added TTFT p50 / p99, {args.ttft_streams} streams in bursts ({o['burst_pairs']} / {n['burst_pairs']} "
            f"pairs) | {o['burst_p50_ms']:.2f} / {o['burst_p99_ms']:.2f} ms | {n['burst_p50_ms']:.2f} / "
            f"{n['burst_p99_ms']:.2f} ms | {o['burst_p99_ms'] - n['burst_p99_ms']:+.2f} ms (p99) | |",
            f"| chunks/s delivered, {args.streams} streams (direct {f['direct']['chunks_per_s'][0]:.0f}) | "
            f"{o['chunks_per_s'][0]:.0f} | {n['chunks_per_s'][0]:.0f} | | |",
            f"| non-streamed req/s at saturation (direct {f['direct']['rps'][0]:.0f}) | {o['rps'][0]:.0f} | "
            f"{n['rps'][0]:.0f} | | |",
            f"| run-queue wait at saturation, share of wall time | {o['wait_share_short']:.0%} | "
            f"{n['wait_share_short']:.0%} | | |",
        ]
    lines.append(f"| opskit's Python work per chunk, in-process, no I/O: with / without metering | "
                 f"{f['py_chunk_us']:.1f} / {f['py_chunk_nometer_us']:.1f} us |" + (" | | |" if n else ""))
    lines.append(f"| the same with metering, the thread asleep 0.2 ms before each chunk (cold) | "
                 f"{f['py_chunk_woken_us']:.1f} us |" + (" | | |" if n else ""))
    if "floor" in f:
        fl = f["floor"]
        lines += ["", f"The floor, same run: a bare byte relay in Python on uvloop (bench/relay_floor.py: no HTTP "
                  f"parsing, no metering) costs {fmt3(fl['cpu_chunk_us'], ' us')} per chunk and "
                  f"{fmt3(fl['cpu_request_us'], ' us', 0)} per non-streamed request: the rest of opskit's figures is "
                  f"opskit's own work."]
    for name, c in f.items():
        if name.startswith("opskit@") and n is not None:
            lines += ["", f"Side by side with {name} (same run; ratios to nginx): CPU per chunk {c['cpu_chunk_us'][0]:.1f} "
                      f"-> {o['cpu_chunk_us'][0]:.1f} us ({c['cpu_chunk_us'][0] / n['cpu_chunk_us'][0]:.2f}x -> {rc:.2f}x), "
                      f"per request {c['cpu_request_us'][0]:.0f} -> {o['cpu_request_us'][0]:.0f} us "
                      f"({c['cpu_request_us'][0] / n['cpu_request_us'][0]:.2f}x -> {rr:.2f}x), user time per chunk "
                      f"{c['user_chunk_us']:.1f} -> {o['user_chunk_us']:.1f} us, added TTFT p99 steady "
                      f"{c['ttft_p99_ms']:.2f} -> {o['ttft_p99_ms']:.2f} ms (nginx {n['ttft_p99_ms']:.2f})."]
    if sat:
        lines += ["", f"Saturation ({sat['streams']} streams at ITL 0, proxy cores {sat['cores']}): chunks/s "
                  f"1 worker {fmt3(sat['w1'], '', 0)}, 2 workers {fmt3(sat['w2'], '', 0)}, scaling ratio "
                  f"{sat['w2'][0] / sat['w1'][0]:.2f}; direct {fmt3(sat['direct'], '', 0)}. Proxy CPU per chunk (all "
                  f"its processes): 1 worker {fmt3(sat['cpu_w1'], ' us')}, 2 workers {fmt3(sat['cpu_w2'], ' us')}"
                  + (f". nginx: chunks/s {fmt3(sat['nginx'], '', 0)}, CPU per chunk {fmt3(sat['cpu_nginx'], ' us')} "
                     f"(opskit/nginx {sat['cpu_w1'][0] / sat['cpu_nginx'][0]:.2f}x)" if sat["nginx"] else "")]
    return "\n".join(lines)


NOTES = """
How to read it:

- CPU figures are each proxy's whole CPU time (/proc, user + system) over what it relayed: per SSE
  event in the streams phase, per request in the short phase. nginx does the same work per event in C:
  wake up, one `recv` from the upstream, one `send` to the client. The user-time row splits it: the
  system time (the kernel's recv, send and epoll for the process) is the same for both proxies, and
  opskit makes fewer system calls a request than nginx (strace -c, a one-off run: 2 read, 2 write,
  0.36 epoll_pwait; nginx 2 recvfrom, 2 writev, 1 getsockopt, 0.39 epoll_wait); the gap is user time.
- Added TTFT is paired, so the mock's own lateness cancels, but the extra hop is one more process
  that must be scheduled: with a load average above the CPU count, run-queue waits dominate p99.
- History: the first version used aiohttp's client for the upstream: 62-94 us per chunk (gross),
  330-490 us per request. opskit.sidecar.upstream_client pushes each chunk from `data_received`
  instead, and a body that is complete with its head goes out in one write.
- Where opskit's CPU goes. The floor (a bare Python relay on uvloop) costs what nginx costs, per chunk
  and per request: Python and uvloop are not the limit; opskit's own work is. Split by a fit over
  runs of 40- and 4-token streams (200 streams; a one-off script, not this one): a streamed call costs
  opskit ~147 us once (request and response heads, the call's record and series) and ~31.5 us per
  event; nginx ~14 us and ~22.2 us. At 40 tokens a stream the once-per-call part is ~3.3 us of each
  chunk (nginx ~0.3). The per-event Python is ~2.6 us in process and hot, but runs cold in the proxy
  (one event per read, the loop asleep between reads: the bench's "thread asleep" line), ~3x that;
  perf: the kernel ~49 % of the proxy's samples, libpython ~38 %, uvloop ~6 %, msgspec ~2.5 %.
  At saturation, where each read carries several events, opskit costs ~9 us a chunk against nginx's
  ~7 (~1.3-1.4x). Removed on the way: aiohttp's server side (~35 % of a request; now llhttp through
  httptools), young GC collections (a reference cycle per call), a getpid() syscall per exchange
  (Python 3.11's get_running_loop), a regex with lookarounds over each response head, json.loads'
  encoding sniffing, prometheus_client's loop over histogram buckets; then a full JSON parse per event
  (msgspec now decodes only the fields metering reads: ~0.6 us instead of ~1.7), the re-framing of
  each relayed chunk (a whole upstream chunk goes to a chunked client as it came), three passes over
  each response head (one now), prometheus_client's checks per counter update (an adder now: the
  value's own `inc`), a frame per event (a whole chunk is taken in data_received), then the JSON
  decode of most text events (a stream's chunk template, learned and proven from its first text chunk,
  accounts the others: opskit.core.stream_meter). Tried and dropped: metering in batches off the relay
  path, 10 ms behind (no gain measured side by side: 41.7 -> 39.4 us, then 40.2 -> 40.2); holding a
  stream's reads and metering 16 at a time (user time per event 16.1 vs 17.6 us in one rotated A/B of
  6 rounds, 17.0 vs 16.9 in the next of 8).
- Instructions are not where most of the time goes. bench/proxy_instructions.py counts them in the
  proxy process itself (cachegrind; start and stop subtracted): a non-streamed call ~291k, a relayed
  event ~23k, with ~8,300 and ~900 simulated first-level instruction-cache misses. The same call is
  ~38 us of Python in process and hot, ~100 us of user time in the proxy, which sleeps between
  reads: about one instruction per cycle; each miss costs ~10-40 cycles. The last trims (fewer frames
  per event, per counter and per call, field values cut only for the fields read) took 9 % of a
  request's instructions and 13 % of an event's, but only 3 % of a request's cache misses (12 % of an
  event's); side by side (--compare, four runs) CPU per chunk fell in two runs (3.5, 5.5 %) and rose
  in two (2, 17 %), CPU per request moved -1.5 to +9 %: nothing the noise lets through. A proxy woken
  for each read pays for the code it touches, not only for the instructions it runs: user time per
  request at 4 / 32 / 128 concurrent calls (a one-off run): 151 / 99 / 89 us (nginx 20 / 15 / 14).
  The templates then took an event from ~24k instructions to ~19k (I1 misses ~900 -> ~680, D1 ~480 ->
  ~260) and the in-process Python per chunk from 2.0 to 1.3-1.7 us, hot; in the proxy, user time per event
  (rotated A/B runs of 6-10 rounds, one-off script) was 15.0-17.2 us with templates, 15.7-19.1 us with
  a decode per event, 13.1-13.4 us with streams not metered at all, nginx 4.0-5.7 us; at 10 ms between
  tokens (up to 20,000 events/s, busier, warmer) 10.2 vs 11.2 us. Metering an event costs ~3-4 us of
  user time in the woken proxy for ~6,000 instructions: cold code and data again.
- Added TTFT in bursts is mostly the load client's queueing: all 50 workers start at once and stay in
  step, so streams start in waves, and each round opens 100 new connections at once from a client
  that shares its core with the mock. Pair by pair (a probe timing each pair within its round, one
  proxy at a time), the worst pairs were each round's first for opskit and nginx alike (18-22 ms over
  the direct call at their p90), and there the direct call itself was ~35 ms late against the mock's
  truth. The steady-state figure (starts spread over one pair's length, first pairs not counted) is
  what a proxy adds to one caller's TTFT among 50 concurrent streams; the burst row shows the tail.
- Saturation on a 2-core machine cannot show scaling: the mock and the client need a core of their
  own, so the 2 workers share cores with them (and with whatever else runs). CPU per chunk with 1 and
  with 2 workers says what each added core buys; give the proxy free cores with --sat-cores.
"""


def write_readme(text: str, command: str) -> None:
    """Replace the proxy section of bench/README.md (between its markers), or append it."""
    block = (f"<!-- proxy:begin -->\n## proxy\n\nMeasured by `{command}` on {time.strftime('%Y-%m-%d')}:\n\n"
             f"{text}\n{NOTES}<!-- proxy:end -->")
    old = README.read_text() if README.exists() else "# Benchmarks\n"
    pattern = re.compile(r"<!-- proxy:begin -->.*?<!-- proxy:end -->", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    README.write_text(new)


def saturation(args, mock: dict, tmp: str, pinned: bool, nginx: dict | None) -> dict:
    """chunks/s at saturation through opskit with 1 and with 2 proxy workers, through nginx (on the first
    of the proxy cores) and direct; CPU per chunk of each proxy, where every read carries several events."""
    cores = args.sat_cores
    admin(mock["admin_url"], "latency", {"ttft_ms": 0, "ttft_jitter_ms": 0, "itl_ms": 0, "itl_jitter_ms": 0,
                                         "output_tokens_mean": 200, "output_tokens_spread": 0})
    out = {"streams": args.sat_streams, "cores": cores, "w1": [], "w2": [], "direct": [], "cpu_w1": [], "cpu_w2": [],
           "nginx": [], "cpu_nginx": []}
    procs = {}
    for w in (1, 2):
        procs[w] = start_proxy(mock["url"], Path(tmp, f"sat{w}.json"), cores if pinned else None, workers=w)
    try:
        for i in range(args.rounds):
            sides = [("w1", procs[1][1]["proxy_url"], procs[1][1]["pid"]),
                     ("w2", procs[2][1]["proxy_url"], procs[2][1]["pid"]), ("direct", mock["url"], None)]
            if nginx is not None:
                sides.append(("nginx", nginx["url"], nginx["pid"]))
            for key, url, pid in sides[::1 if i % 2 == 0 else -1]:
                cpu0 = tree_cpu_seconds(pid) if pid else 0.0
                res = asyncio.run(load(url, "streams", args.sat_streams, args.seconds, 200))
                out[key].append(res["events"] / res["elapsed"])
                if pid:  # the exporter and its workers: CPU per chunk says what one more core buys
                    out["cpu_" + key].append((tree_cpu_seconds(pid) - cpu0) / max(1, res["events"]) * 1e6)
    finally:
        for p, _ in procs.values():
            p.send_signal(signal.SIGTERM)
            p.wait(30)
    return {k: med_spread(v) if isinstance(v, list) and v else v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--ttft-streams", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--ttft-tokens", type=int, default=10, help="tokens per stream in the added-TTFT phase")
    ap.add_argument("--itl-ms", type=float, default=50.0)
    ap.add_argument("--short-concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--saturation", action="store_true", help="also chunks/s at saturation with 1 and 2 workers")
    ap.add_argument("--sat-streams", type=int, default=200)
    ap.add_argument("--sat-cores", default="1", help="cores (taskset list) for the proxy in the saturation phase")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin (when neighbours keep the cores busy, pinning only adds run-queue waits)")
    ap.add_argument("--compare", metavar="REV", help="also run the proxy as of git revision REV (from a temporary "
                    "worktree) in every phase: what a change bought, measured side by side")
    ap.add_argument("--write-readme", action="store_true", help="put the figures into bench/README.md")
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    load_before = float(Path("/proc/loadavg").read_text().split()[0])
    pinned = args.pin and bool(shutil.which("taskset")) and os.cpu_count() >= 2
    if pinned:
        os.sched_setaffinity(0, {0})
    sat = None
    with tempfile.TemporaryDirectory() as tmp:
        mock_p, mock = spawn([sys.executable, "-m", "opskit", "mock", "--listen", "127.0.0.1:0", "--ready-file",
                              f"{tmp}/mock.json"], 0 if pinned else None, Path(tmp, "mock.json"))
        proxy_p, proxy = start_proxy(mock["url"], Path(tmp, "proxy.json"), 1 if pinned else None)
        procs = [proxy_p, mock_p]
        sides = {"direct": {"url": mock["url"]}, "opskit": {"url": proxy["proxy_url"], "pid": proxy["pid"]}}
        host, port = mock["url"].split("//", 1)[1].rsplit(":", 1)
        floor_p, floor = spawn([sys.executable, str(ROOT / "bench" / "relay_floor.py"), host, port, f"{tmp}/floor.json"],
                               1 if pinned else None, Path(tmp, "floor.json"))
        procs.append(floor_p)
        sides["floor"] = floor
        if args.compare:
            rev = Path(tmp, "rev")
            why = add_worktree(args.compare, rev)
            if why is not None:
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                sys.exit(f"--compare {args.compare}: {why}")
            old_p, old = start_proxy(mock["url"], Path(tmp, "old.json"), 1 if pinned else None, cwd=rev)
            procs.append(old_p)
            sides["opskit@" + args.compare] = {"url": old["proxy_url"], "pid": old["pid"]}
        nginx = start_nginx(tmp, mock["url"], 1 if pinned else None)
        if nginx is not None:
            procs.insert(0, nginx[0])
            sides["nginx"] = nginx[1]
        else:
            print("nginx not found (apt-get install nginx-light): opskit's figures only", file=sys.stderr)
        try:
            admin(mock["admin_url"], "latency", {"ttft_ms": 50, "ttft_jitter_ms": 5, "itl_ms": args.itl_ms,
                                                 "itl_jitter_ms": 0, "output_tokens_mean": args.tokens,
                                                 "output_tokens_spread": 0, "capacity": 100000})
            streams = run_phase("streams", args, sides)
            diffs, bursts = ttft_phase(args, sides)
            admin(mock["admin_url"], "latency", {"ttft_ms": 0, "ttft_jitter_ms": 0, "itl_ms": 0})
            short = run_phase("short", args, sides)
            if args.saturation:
                sat = saturation(args, mock, tmp, pinned, nginx[1] if nginx is not None else None)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
            if args.compare:
                remove_worktree(rev)
    figures = summarize(streams, short, diffs, bursts)
    figures["py_chunk_us"], figures["py_chunk_nometer_us"], figures["py_chunk_woken_us"] = python_per_chunk_us()
    text = report(figures, args, pinned, (load_before, float(Path("/proc/loadavg").read_text().split()[0])), sat)
    print(text)
    if args.write_readme:
        write_readme(text, "python bench/proxy_overhead.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
