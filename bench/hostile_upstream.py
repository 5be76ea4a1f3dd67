"""What a hostile upstream response costs `opskit exporter`'s metering proxy, and everyone else on it.

Targets: while one gzip bomb (1 MB on the wire, 1 GiB inflated) and one stream with a 64 MiB SSE
`data:` line (sent in 4 KiB writes) pass through the proxy at the same time, `/healthz` answers
within 250 ms at worst, the exporter's peak RSS stays <= 250 MB, every byte reaches the client
unchanged, and each call is counted exactly once in `opskit_llm_requests_total`.

The exporter is the real `opskit exporter` in its own process (core 1 with taskset); the scripted
upstream runs in a second process and this script is the client (both on core 0). While the two
hostile calls are relayed, a poller GETs `/healthz` every 10 ms over one keep-alive connection and
keeps the worst latency; the peak RSS is the exporter's VmHWM from /proc, its CPU time from
/proc/PID/stat. `--opskit DIR` runs the exporter from another checkout (e.g. a worktree of main)
for a before/after comparison.

    .venv/bin/python bench/hostile_upstream.py [--rounds 3] [--bomb-mib 1024] [--line-mib 64] [--opskit DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def gzip_bomb(mib: int) -> bytes:
    """A gzip of `mib` MiB of zeros, built from one repeated deflate block (fast, ~1 KB per MiB)."""
    zeros = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, no reference to earlier data
    end = c.flush()
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + block * mib + end + struct.pack("<II", crc, (mib * MIB) & 0xFFFFFFFF)


def sse_body(line_mib: int) -> bytes:
    return (b"data: " + b"x" * (line_mib * MIB) + b"\n\n"
            b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
            b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\ndata: [DONE]\n\n')


# ---------------------------------------------------------------- the scripted upstream (its own process)

def upstream_main(port_q, bomb_mib: int, line_mib: int) -> None:
    bomb, sse = gzip_bomb(bomb_mib), sse_body(line_mib)
    heads = {
        b"/bomb": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(bomb), bomb, 64 * 1024),
        b"/line": (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(sse),
                   sse, 4096),
    }

    async def handle(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                           if k.strip().lower() == b"content-length"), 0)
            await reader.readexactly(length)
            path = head.split(b" ", 2)[1]
            start, body, step = heads[b"/bomb" if path.startswith(b"/bomb") else b"/line"]
            writer.write(start)
            for i in range(0, len(body), step):
                writer.write(body[i:i + step])
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_q.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(serve())


# ---------------------------------------------------------------- the client side (this process)

async def call(proxy_port: int, path: str) -> tuple[int, str, float]:
    """POST to the proxy; (status, sha256 of the raw body, seconds)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    body = json.dumps({"model": "m", "messages": []}).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept-Encoding: gzip\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    chunked = b"transfer-encoding: chunked" in head.lower()
    digest = hashlib.sha256()
    raw = b""
    while data := await reader.read(1 << 16):
        if chunked:
            raw += data  # de-chunked below; the SSE response is only ~64 MiB
        else:
            digest.update(data)
    writer.close()
    if chunked:
        digest.update(dechunk(raw))
    return int(head.split(b" ", 2)[1]), digest.hexdigest(), time.perf_counter() - t0


def dechunk(raw: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(raw[end + 2:end + 2 + size])
        pos = end + 2 + size + 2


async def poll_healthz(port: int, stop: asyncio.Event) -> list[float]:
    """GET /healthz every 10 ms over one keep-alive connection; each latency in seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lat = []
    while not stop.is_set():
        t0 = time.perf_counter()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        lat.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    writer.close()
    return lat


def requests_total(metrics_port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "opskit_llm_requests_total" and s.value:
                out[f'{s.labels["code"]}/{s.labels["error_type"] or "ok"}'] = s.value
    return out


def proc_figures(pid: int) -> tuple[float, float]:
    """(peak RSS MB, CPU seconds) of a process, from /proc."""
    status = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(status["VmHWM"].split()[0]) / 1024, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else []


def one_round(upstream_url: str, expected: dict[str, str], opskit_dir: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        env = dict(os.environ)
        if opskit_dir:
            env["PYTHONPATH"] = opskit_dir
        argv = [*pin(1), sys.executable, "-m", "opskit", "exporter", "--listen", "127.0.0.1:0", "--proxy-listen",
                "127.0.0.1:0", "--upstream", upstream_url, "--no-gpu", "--ready-file", str(ready)]
        if not opskit_dir:  # (a checkout from before the flag has no linger to skip)
            argv += ["--metrics-linger-s", "0"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp)
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        port, proxy_port = int(info["url"].rsplit(":", 1)[1]), int(info["proxy_url"].rsplit(":", 1)[1])
        rss0, cpu0 = proc_figures(proc.pid)

        async def run():
            stop = asyncio.Event()
            poller = asyncio.create_task(poll_healthz(port, stop))
            await asyncio.sleep(0.2)
            results = await asyncio.gather(call(proxy_port, "/bomb/v1/chat/completions"),
                                           call(proxy_port, "/line/v1/chat/completions"))
            await asyncio.sleep(0.2)
            stop.set()
            return results, await poller

        (bomb, line), lat = asyncio.run(run())
        time.sleep(0.3)  # the proxy records a call just after its last byte
        counts = requests_total(port)
        rss, cpu = proc_figures(proc.pid)
        proc.terminate()
        proc.wait(30)
    return {"healthz_max_ms": max(lat) * 1e3, "healthz_p50_ms": statistics.median(lat) * 1e3,
            "healthz_polls": len(lat), "rss_start_mb": rss0, "rss_peak_mb": rss, "cpu_s": cpu - cpu0,
            "bomb_s": bomb[2], "line_s": line[2], "bytes_unchanged": bomb[1] == expected["bomb"]
            and line[1] == expected["line"], "statuses": f"{bomb[0]},{line[0]}", "counted": counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bomb-mib", type=int, default=1024)
    ap.add_argument("--line-mib", type=int, default=64)
    ap.add_argument("--opskit", help="run the exporter from this checkout (PYTHONPATH) instead of this one")
    args = ap.parse_args()
    expected = {"bomb": hashlib.sha256(gzip_bomb(args.bomb_mib)).hexdigest(),
                "line": hashlib.sha256(sse_body(args.line_mib)).hexdigest()}
    q = multiprocessing.get_context("spawn").Queue()
    up = multiprocessing.get_context("spawn").Process(target=upstream_main, args=(q, args.bomb_mib, args.line_mib),
                                                      daemon=True)
    up.start()
    upstream_url = f"http://127.0.0.1:{q.get(timeout=60)}"
    if pin(0):
        os.sched_setaffinity(0, {0})
        os.sched_setaffinity(up.pid, {0})
    print(f"host: {os.cpu_count()} cores; exporter {'on core 1' if pin(1) else 'unpinned'}; bomb "
          f"{len(gzip_bomb(args.bomb_mib)) / 1e6:.2f} MB -> {args.bomb_mib} MiB; SSE line {args.line_mib} MiB "
          f"in 4 KiB writes; exporter code: {args.opskit or ROOT}")
    rows = []
    for i in range(args.rounds):
        r = one_round(upstream_url, expected, args.opskit)
        rows.append(r)
        print(f"round {i + 1}: " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in r.items()))
    up.terminate()
    print(f"median: healthz_max_ms={statistics.median(r['healthz_max_ms'] for r in rows):.1f} (target <= 250) "
          f"rss_peak_mb={statistics.median(r['rss_peak_mb'] for r in rows):.1f} (target <= 250) "
          f"cpu_s={statistics.median(r['cpu_s'] for r in rows):.2f} "
          f"every_call_counted_once={all(sum(r['counted'].values()) == 2 for r in rows)}")


if __name__ == "__main__":
    main()
