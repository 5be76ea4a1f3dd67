"""Scrape cost and memory of `opskit exporter`: /metrics with 8 GPUs (every health reading, XIDs
counted by the event thread, two GPUs in MIG mode with 3 MIG devices each) and 10 targets' call series.

Targets: a scrape <= 10 ms, exporter RSS <= 80 MB. The exporter runs as its own process on the fake
NVML (opskit/live/fakenvml, 8 GPUs, loaded through LD_LIBRARY_PATH by the real pynvml binding) with a
config of 10 targets x 2 models; before it reports ready it is filled with call series for every
target x source (proxy, probe) x model (2 configured + other) x outcome (200, 429, 500), which is
more label sets than a sidecar normally has. The client times /metrics over one keep-alive
connection; the server's CPU per scrape comes from its own /proc accounting. Server and client are
pinned to different cores when there are two.

    .venv/bin/python bench/exporter_scrape.py [--scrapes 300]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = 10
MODELS = ("model-a", "model-b")


def write_config(path: Path) -> None:
    lines = ["targets:"]
    for i in range(TARGETS):
        lines += [f"  - name: target-{i}", f"    base_url: http://127.0.0.1:{9000 + i}/v1",
                  f"    models: [{', '.join(MODELS)}]", "    daily_quota_requests: 100000"]
    path.write_text("\n".join(lines) + "\n")


def populate(metrics, cfg) -> None:
    """Call series for every target x source x model x outcome, with tokens and latencies."""
    from opskit.core.records import CallRecord

    outcomes = ((200, ""), (429, "rate_limited"), (500, "server_error"))
    for t in cfg.targets:
        for source in ("proxy", "probe"):
            for model in (*MODELS, "unlisted-model"):
                for code, err in outcomes:
                    for k in range(5):
                        metrics.observe(CallRecord(
                            t.name, source, model, code, err, duration_s=0.2 + 0.3 * k, ttft_s=0.05 * (k + 1),
                            input_tokens=100, output_tokens=50, streamed=True, ratelimit_remaining_requests=99,
                            request_id=f"chatcmpl-{t.name}-{model}-{k}-0123456789abcdef"))  # exemplars


def serve(config_path: str, ready: str) -> None:
    """The exporter process: the real Exporter, filled with synthetic call series, until SIGTERM."""
    import asyncio
    import gc
    import logging

    import prometheus_client

    from opskit.core import config, readyfile
    from opskit.sidecar import exporter, exporter_server
    from opskit.sidecar.gpu import visible_from_env

    logging.basicConfig(level=logging.WARNING)
    prometheus_client.disable_created_metrics()
    cfg = config.load(config_path)
    opts = exporter_server.Options(listen=("127.0.0.1", 0), visible_devices=visible_from_env(os.environ))

    async def main() -> None:
        ex = exporter_server.Exporter(cfg, opts)
        await ex.start()
        populate(ex.metrics, cfg)
        gc.freeze()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        readyfile.write(Path(ready), ex.ready_info())
        await stop.wait()
        await ex.close()

    exporter._run(main())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if (os.cpu_count() or 1) >= 2 and os.path.exists("/usr/bin/taskset") else []


def bench_gpus(xids: tuple[int, ...] = ()) -> list:
    """8 fake GPUs with every health reading present, throttled, with `xids`; GPUs 6 and 7 in MIG mode."""
    from opskit.live.fakenvml import FakeMig, fake_gpus, mig_uuid_for

    gpus = fake_gpus(8, util=55, ecc_volatile=1, ecc_aggregate=2, remapped_correctable=1,
                     clocks_event_reasons=0x24, xids=xids)
    for g in gpus[6:]:
        g.mig_mode = 1
        g.migs = tuple(FakeMig(slot, mig_uuid_for(g.index, slot)) for slot in (0, 2, 4))
    return gpus


def measure(scrapes: int) -> None:
    from opskit.live.fakenvml import build_fake_nvml, write_state

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lib = build_fake_nvml(tmp / "lib")
        # Every health reading present, throttled and with XIDs, so each family is in the scrape.
        state = write_state(tmp / "gpus", bench_gpus())
        write_config(tmp / "opskit.yaml")
        env = {**os.environ, "LD_LIBRARY_PATH": str(lib.parent), "FAKE_NVML_STATE": str(state)}
        ready = tmp / "ready.json"
        proc = subprocess.Popen([*pin(1), sys.executable, __file__, "--serve", str(tmp / "opskit.yaml"),
                                 str(ready)], env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("exporter did not start")
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            urllib.request.urlopen(info["url"] + "/metrics", timeout=10).close()  # registers XID events
            write_state(state, bench_gpus(xids=(13, 79, 48)))
            report(info, proc.pid, scrapes)
            report(info, proc.pid, scrapes, OPENMETRICS)
            render_ab(tmp / "opskit.yaml")
            gpu_ab(lib, env)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)


OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"  # as Prometheus asks


def report(info: dict, pid: int, scrapes: int, accept: str | None = None) -> None:
    if pin(0):
        os.sched_setaffinity(0, {0})
    host, port = info["url"].removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def scrape() -> bytes:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200
        return body

    body = b""
    for _ in range(20):  # warm-up: first scrapes initialise NVML handles and caches
        body = scrape()
    times = []
    cpu0 = cpu_seconds(pid)
    for _ in range(scrapes):
        t0 = time.perf_counter()
        scrape()
        times.append(time.perf_counter() - t0)
    cpu = (cpu_seconds(pid) - cpu0) / scrapes
    rss, hwm = rss_mb(pid)
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    times.sort()
    kind = "OpenMetrics with exemplars" if accept else "text 0.0.4"
    migs = body.count(b"opskit_gpu_info{") - 8
    print(f"exporter /metrics ({kind}), 8 fake GPUs + {migs} MIG devices, {TARGETS} targets: {samples} samples, "
          f"{len(body) / 1024:.0f} KiB")
    print(f"  scrape wall (client, keep-alive): median {statistics.median(times) * 1e3:.2f} ms, "
          f"p95 {times[int(0.95 * len(times))] * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms  (n={scrapes})")
    print(f"  exporter CPU per scrape: {cpu * 1e3:.2f} ms")
    print(f"  exporter RSS: {rss:.1f} MB now, {hwm:.1f} MB peak   (targets: scrape <= 10 ms, RSS <= 80 MB)")


def render_ab(config_path: Path, rounds: int = 7) -> None:
    """In this process: prometheus_client's generate_latest vs opskit.sidecar.fast_exposition on the same registry."""
    import timeit

    import prometheus_client
    from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest

    from opskit.core import config
    from opskit.sidecar import exporter_server
    from opskit.sidecar.fast_exposition import Renderer

    prometheus_client.disable_created_metrics()
    cfg = config.load(config_path)
    reg, metrics = exporter_server.build_registry(cfg)
    populate(metrics, cfg)
    renderer = Renderer(reg)
    assert renderer.render() == prometheus_client.generate_latest(reg)
    assert renderer.render(True) == om_generate_latest(reg)
    a, b, c, d = [], [], [], []
    for _ in range(rounds):  # alternate A and B so drift from other load hits both
        a.append(timeit.timeit(lambda: prometheus_client.generate_latest(reg), number=3) / 3)
        b.append(timeit.timeit(renderer.render, number=3) / 3)
        c.append(timeit.timeit(lambda: om_generate_latest(reg), number=3) / 3)
        d.append(timeit.timeit(lambda: renderer.render(True), number=3) / 3)
    ma, mb, mc, md = (statistics.median(x) for x in (a, b, c, d))
    print(f"  call series render, in-process (median of {rounds}): generate_latest {ma * 1e3:.1f} ms, "
          f"opskit.sidecar.fast_exposition {mb * 1e3:.1f} ms ({ma / mb:.0f}x); OpenMetrics with exemplars: "
          f"{mc * 1e3:.1f} ms vs {md * 1e3:.1f} ms ({mc / md:.0f}x)")


def gpu_ab(lib: Path, env: dict, rounds: int = 7, n: int = 50) -> None:
    """In a child process on the same fake NVML: one GPU collect() of the 8 GPUs with the health readings,
    XID counts and MIG devices (B), without the health readings (A, stubbed out) and without the MIG
    enumeration (C, stubbed out), alternating."""
    code = f"""
import statistics, timeit
from opskit.sidecar import gpu, gpu_health
c = gpu.GpuCollector(lib_path={str(lib)!r})
real_health, real_migs = gpu.read_health, c._migs.read
def run():
    return sum(len(f.samples) for f in c.collect())
a, b, m = [], [], []
for _ in range({rounds}):
    gpu.read_health = lambda h, e: gpu_health.Health()
    na = run(); a.append(timeit.timeit(run, number={n}) / {n})
    gpu.read_health = real_health
    nb = run(); b.append(timeit.timeit(run, number={n}) / {n})
    c._migs.read = lambda *args: []
    nm = run(); m.append(timeit.timeit(run, number={n}) / {n})
    c._migs.read = real_migs
ma, mb, mm = statistics.median(a), statistics.median(b), statistics.median(m)
print(f"  GPU collect, 8 GPUs, in-process (median of {rounds}): everything {{mb * 1e3:.2f}} ms ({{nb}} samples); "
      f"without health readings {{ma * 1e3:.2f}} ms ({{na}} samples, health +{{(mb - ma) * 1e3:.2f}} ms); "
      f"without MIG devices {{mm * 1e3:.2f}} ms ({{nm}} samples, MIG +{{(mb - mm) * 1e3:.2f}} ms)")
c.close()
"""
    subprocess.run([*pin(1), sys.executable, "-c", code], env=env, cwd=ROOT, check=True, timeout=300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scrapes", type=int, default=300)
    ap.add_argument("--serve", nargs=2, metavar=("CONFIG", "READY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
    else:
        measure(args.scrapes)


if __name__ == "__main__":
    main()
