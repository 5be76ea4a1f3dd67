"""`opskit calllog stats` on small call logs written here (plain and gzip files, malformed lines)."""

from __future__ import annotations

import gzip
import json

from click.testing import CliRunner

from opskit.cli import main
from opskit.sidecar import call_log_stats


def rec(ts: str, model: str = "m1", err: str | None = None, dur: float = 1.0, ttft: float | None = None,
        tokens: tuple = (10, 2, 5, 1), **extra) -> str:
    inp, cached, out, reasoning = tokens
    obj = {"v": 1, "ts": ts, "target": "https://api.example.com", "model": model, "stream": ttft is not None,
           "status": 200 if err is None else 429, "error_type": err, "duration_s": dur, "ttft_s": ttft,
           "tpot_s": None, "tokens": {"input": inp, "cached_input": cached, "output": out, "reasoning": reasoning},
           "request_id": "r", "caller": "abc", "prefix_block_chars": 256, "prefix_hashes": [], **extra}
    return json.dumps(obj)


def test_stats_of_a_small_log(tmp_path):
    lines_a = [rec(f"2026-12-01T09:{i:02d}:00.000Z", dur=float(i + 1), ttft=0.1 * (i + 1)) for i in range(10)]
    lines_a.insert(3, "{not json")
    lines_a.insert(6, "")
    (tmp_path / "calls-20261201T090000Z.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines_a) + "\n").encode()))
    lines_b = [rec("2026-12-01T10:00:01.000Z", model="m2", err="rate_limited", dur=0.01, tokens=(None, None, 0, None)),
               rec("2026-12-01T10:00:02.000Z", model="m2", dur=4.0),
               '["an array"]', '{"v": 1, "ts": "not a time"}',
               json.dumps({"ts": "2026-12-01T10:00:03.000Z", "model": "m2", "duration_s": 2.0, "error_type": None,
                           "extra": {"nested": [1, 2]}})]  # other key order, missing fields: still usable
    (tmp_path / "calls-20261201T100000Z.jsonl").write_text("\n".join(lines_b) + "\n")
    (tmp_path / "unrelated.txt").write_text("ignored")
    res = CliRunner().invoke(main, ["calllog", "stats", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "calls: 13 from 2026-12-01T09:00:00Z to 2026-12-01T10:00:03Z (2 files)" in out
    assert "malformed lines skipped: 3 (calls-20261201T090000Z.jsonl.gz:4, calls-20261201T100000Z.jsonl:3" in out
    assert "errors: 1 (7.69%)" in out and "rate_limited" in out
    assert "input                           110" in out and "output                           55" in out
    assert out.index("m1") < out.index("m2")  # by calls
    hour9 = next(line for line in out.splitlines() if line.strip().startswith("2026-12-01 09:00"))
    # successful calls of 09:00: durations 1..10 s -> p50 5.5 s; TTFT 0.1..1.0 s -> p50 0.55 s
    assert hour9.split()[2:5] == ["10", "0", "5500"] and hour9.split()[7] == "550"
    hour10 = next(line for line in out.splitlines() if line.strip().startswith("2026-12-01 10:00"))
    assert hour10.split()[2:5] == ["3", "1", "3000"] and hour10.split()[-1] == "-"  # no TTFT: none streamed


def test_loader_batches_and_line_by_line_agree(tmp_path):
    lines = [rec(f"2026-12-01T09:00:{i % 60:02d}.000Z", dur=i / 100) for i in range(12_000)]
    good = tmp_path / "good"
    good.mkdir()
    (good / "calls-20261201T090000Z.jsonl").write_text("\n".join(lines) + "\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    lines[7_777] = '{"ts": "2026-12-01T09:00:00.000Z"} {"two": "values"}'
    (bad / "calls-20261201T090000Z.jsonl").write_text("\n".join(lines) + "\n")
    a, b = call_log_stats.load([good]), call_log_stats.load([bad])
    assert a.malformed == 0 and b.malformed == 1 and b.bad_at == ["calls-20261201T090000Z.jsonl:7778"]
    assert len(a.columns["ts"]) == 12_000 and len(b.columns["ts"]) == 11_999
    assert b.columns["duration_s"] == a.columns["duration_s"][:7_777] + a.columns["duration_s"][7_778:]


def test_no_usable_line_is_one_line_exit_2(tmp_path):
    (tmp_path / "calls-20261201T090000Z.jsonl").write_text("garbage\n[1]\n")
    (tmp_path / "calls-20261201T100000Z.jsonl.gz").write_bytes(b"not gzip")
    res = CliRunner().invoke(main, ["calllog", "stats", str(tmp_path)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "no usable call-log line" in res.output and "3 malformed" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["calllog", "stats", str(empty)])
    assert res.exit_code == 2 and "no usable call-log line" in res.output and "0 files" in res.output
    res = CliRunner().invoke(main, ["calllog", "stats", str(tmp_path / "missing")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1


def test_parallel_reading_gives_the_same_records(tmp_path):
    for h in range(3):
        lines = [rec(f"2026-12-01T0{h}:00:{i:02d}.000Z", dur=h + i / 100) for i in range(50)] + ["bad"]
        (tmp_path / f"calls-20261201T0{h}0000Z.jsonl").write_text("\n".join(lines) + "\n")
    one, many = call_log_stats.load([tmp_path], jobs=1), call_log_stats.load([tmp_path], jobs=3)
    assert one.columns == many.columns and len(one.columns["ts"]) == 150
    assert (one.files, one.malformed, one.bad_at) == (many.files, many.malformed, many.bad_at) == (
        3, 3, [f"calls-20261201T0{h}0000Z.jsonl:51" for h in range(3)])
