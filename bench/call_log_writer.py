"""What the call log costs: the proxy's side (`CallLog.submit`, on the event loop, per call) and the
writer thread's (building, hashing and writing a record), in this process.

The writer's throughput is measured through the real thread and files: N records are queued at once
and the time until `close()` has written, rotated and compressed them all is taken.

    .venv/bin/python bench/call_log_writer.py [--records 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from time import perf_counter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from prometheus_client import CollectorRegistry

    from opskit.core.records import CallRecord
    from opskit.sidecar import call_log_record
    from opskit.sidecar.call_log import CallLog, CallLogOptions
    from opskit.sidecar.metering import MeteredCall

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    args = ap.parse_args()
    body = json.dumps({"model": "m", "max_tokens": 200, "stream": True, "messages": [
        {"role": "system", "content": "s" * 2000}, {"role": "user", "content": "u" * 500}]}).encode()
    call = MeteredCall(perf_counter())
    call.model, call.request_body = "m", body
    rec = CallRecord("t", "proxy", "m", 200, "", 0.5, ttft_s=0.1, input_tokens=600, output_tokens=100,
                     tokens_from_usage=True, streamed=True, request_id="chatcmpl-0123456789")
    with tempfile.TemporaryDirectory() as tmp:
        log = CallLog(CallLogOptions(Path(tmp), queue_size=10 ** 7), "http://up", CollectorRegistry(), env={})
        n = 50_000
        sub = [timeit.timeit(lambda: log.submit(rec, call, "Bearer sk-x"), number=n) / n for _ in range(5)]
        log._queue.clear()
        build = [timeit.timeit(lambda: json.dumps(call_log_record.build(
            rec, 1.7e9, "http://up", "m", body, "Bearer sk-x", b"k"), separators=(",", ":")), number=2000) / 2000
            for _ in range(5)]
        print("record: a streamed call with a 2,500-character prompt (9 prefix hashes), no bodies")
        print(f"  submit, on the event loop: {statistics.median(sub) * 1e6:.2f} us per call (median of 5)")
        print(f"  build + JSON, on the writer thread: {statistics.median(build) * 1e6:.1f} us per record (median of 5)")
        rng = random.Random(1)
        varied = []  # distinct ids, times, tokens and prompts, so that compression sees real variety
        for i in range(1000):
            c = MeteredCall(perf_counter() - rng.random())
            c.model = "m"
            c.request_body = json.dumps({"model": "m", "max_tokens": 200, "stream": True, "messages": [
                {"role": "system", "content": "s" * 2000},
                {"role": "user", "content": "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(1, 3000)))}]
            }).encode()
            varied.append((CallRecord("t", "proxy", "m", 200, "", rng.lognormvariate(0, 1), ttft_s=rng.random(),
                                      input_tokens=rng.randrange(600, 1500), output_tokens=rng.randrange(1, 900),
                                      tokens_from_usage=True, streamed=True,
                                      request_id=f"chatcmpl-{rng.getrandbits(64):016x}"), c, f"Bearer sk-{i % 20}"))
        for i in range(args.records):
            log.submit(*varied[i % 1000])
        t0 = time.perf_counter()
        log.start()
        log.close_sync()
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(tmp).glob("calls-*.jsonl.gz"))
        print(f"  writer thread: {args.records:,} records written and compressed in {wall:.2f} s "
              f"({args.records / wall:,.0f} records/s), {size / args.records:.0f} bytes per record gzipped")


if __name__ == "__main__":
    main()
