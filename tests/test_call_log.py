"""The call log: records from the real openai SDK through the real exporter process, and the writer's
rotation, compression, retention, disk cap and queue-full drops with a fake clock."""

from __future__ import annotations

import gzip
import json
import os
import stat
from pathlib import Path
from time import perf_counter

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from opskit.cli import main
from opskit.core.records import CallRecord
from opskit.sidecar import call_log_record
from opskit.sidecar.call_log import KEY_FILE, CallLog, CallLogOptions, load_key
from opskit.sidecar.metering import MeteredCall
from tests.test_exporter import SECRET, base_env, start_exporter  # noqa: F401

SYSTEM = "You are a careful assistant. " * 20  # 580 characters: two full 256-character blocks


def read_log(directory: Path) -> list[dict]:
    """Every record in a call-log directory, oldest file first."""
    out = []
    for path in sorted(directory.glob("calls-*.jsonl*")):
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        out += [json.loads(line) for line in data.decode().splitlines()]
    return out


def all_bytes(directory: Path) -> bytes:
    return b"".join(gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
                    for p in directory.iterdir() if p.name.startswith("calls-"))


# ------------------------------------------------------------------ the real SDK through the real exporter

@pytest.mark.slow
def test_sdk_calls_through_the_proxy_are_logged(start_exporter, mock_server, tmp_path):  # noqa: F811
    openai = pytest.importorskip("openai")
    logdir = tmp_path / "calls"
    ex = start_exporter("--no-gpu", "--proxy-listen", "127.0.0.1:0", "--upstream", mock_server.url,
                        "--call-log", str(logdir), "--metrics-linger-s", "0", env=base_env())
    client = openai.OpenAI(base_url=ex.info["proxy_url"] + "/v1", api_key=SECRET, timeout=20, max_retries=0)
    other = openai.OpenAI(base_url=ex.info["proxy_url"] + "/v1", api_key=SECRET + "-other", timeout=20,
                          max_retries=0)
    expected = []  # (id, stream, usage, max_tokens, client)
    for i, (c, stream) in enumerate([(client, False), (client, True), (other, True), (client, False)]):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"question {i}"}]
        if stream:
            chunks = list(c.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=5 + i,
                                                    stream=True, stream_options={"include_usage": True}))
            expected.append((chunks[0].id, True, chunks[-1].usage, 5 + i, c))
        else:
            reply = c.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=5 + i)
            expected.append((reply.id, False, reply.usage, 5 + i, c))
    with pytest.raises(openai.APIStatusError):  # a failed call is logged too
        client.chat.completions.create(model="deepseek-chat", messages=[], max_tokens=-1)
    code, err = ex.stop()
    assert code == 0
    records = read_log(logdir)  # closed on SIGTERM: compressed, nothing lost
    assert [p.name.endswith(".jsonl.gz") for p in logdir.glob("calls-*")] == [True]
    assert len(records) == 5
    for rec, (rid, stream, usage, max_tokens, _c) in zip(records, expected, strict=False):
        assert rec["v"] == 1 and rec["request_id"] == rid and rec["stream"] is stream
        assert rec["status"] == 200 and rec["error_type"] is None and rec["model"] == "deepseek-chat"
        assert rec["tokens"]["input"] == usage.prompt_tokens and rec["tokens"]["output"] == usage.completion_tokens
        assert rec["max_tokens"] == max_tokens and rec["target"] == mock_server.url
        assert (rec["ttft_s"] is not None) is stream and rec["duration_s"] > 0
        assert rec["ts"].endswith("Z") and len(rec["ts"]) == len("2026-12-01T09:13:44.123Z")
        assert rec["prefix_block_chars"] == 256 and len(rec["prefix_hashes"]) == len(SYSTEM + "question 0") // 256
        assert "body" not in rec
    assert records[4]["status"] >= 400 and records[4]["error_type"] == "client_error"
    callers = [r["caller"] for r in records]
    assert callers[0] == callers[1] == callers[3] == callers[4] != callers[2] and len(callers[0]) == 16
    assert len({tuple(r["prefix_hashes"]) for r in records[:4]}) == 1  # one shared system prompt
    key = (logdir / KEY_FILE).read_bytes().strip()
    assert stat.S_IMODE((logdir / KEY_FILE).stat().st_mode) == 0o600
    text = all_bytes(logdir)
    assert SECRET.encode() not in text and b"careful assistant" not in text and key not in text
    assert key.decode() not in err and SECRET not in err
    from opskit.loadtest import trace  # the replay's reader takes the log as written (the shared contract)

    replayable = trace.read(logdir)
    assert replayable.format == "opskit" and len(replayable.requests) == 5 and not replayable.skipped
    assert [r.input_tokens for r in replayable.requests[:4]] == [e[2].prompt_tokens for e in expected]
    assert len({r.blocks for r in replayable.requests[:4]}) == 1 and replayable.requests[0].blocks


@pytest.mark.slow
def test_bodies_are_logged_only_when_asked(start_exporter, mock_server, tmp_path):  # noqa: F811
    openai = pytest.importorskip("openai")
    logdir = tmp_path / "calls"
    ex = start_exporter("--no-gpu", "--proxy-listen", "127.0.0.1:0", "--upstream", mock_server.url,
                        "--call-log", str(logdir), "--call-log-bodies", "--metrics-linger-s", "0",
                        env=base_env())
    client = openai.OpenAI(base_url=ex.info["proxy_url"] + "/v1", api_key=SECRET, timeout=20, max_retries=0)
    messages = [{"role": "user", "content": "tell me"}]
    reply = client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=6)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="deepseek-chat", messages=messages, max_tokens=6, stream=True) if c.choices)
    assert ex.stop()[0] == 0
    first, second = read_log(logdir)
    assert first["body"] == {"messages": messages, "completion": reply.choices[0].message.content}
    assert second["body"] == {"messages": messages, "completion": streamed} and streamed


def test_cli_refuses_call_log_flags_that_cannot_work(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["exporter", "--no-gpu", "--target", "http://127.0.0.1:1", "--call-log", str(tmp_path)])
    assert res.exit_code == 2 and "--call-log needs --proxy-listen" in res.output
    res = runner.invoke(main, ["exporter", "--no-gpu", "--target", "http://127.0.0.1:1", "--proxy-listen",
                               "127.0.0.1:0", "--call-log", str(tmp_path), "--call-log-max-bytes", "1M",
                               "--call-log-rotate-bytes", "1M"])
    assert res.exit_code == 2 and "at most half" in res.output
    res = runner.invoke(main, ["exporter", "--no-gpu", "--target", "http://127.0.0.1:1", "--proxy-listen",
                               "127.0.0.1:0", "--call-log", str(tmp_path), "--call-log-max-bytes", "lots"])
    assert res.exit_code == 2 and "not a size" in res.output


def test_an_unusable_directory_is_one_line(tmp_path):
    import subprocess
    import sys

    ro = tmp_path / "a-file"  # a directory under a file: unusable even for root
    ro.write_text("")
    out = subprocess.run([sys.executable, "-m", "opskit", "exporter", "--no-gpu", "--listen", "127.0.0.1:0",
                          "--target", "http://127.0.0.1:1", "--proxy-listen", "127.0.0.1:0",
                          "--call-log", str(ro / "calls")], capture_output=True, text=True, timeout=60,
                         env=base_env())
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "cannot write to the call-log directory" in out.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ the writer, with a fake clock

class Clock:
    def __init__(self) -> None:
        self.now = 1_796_115_600.0  # 2026-12-01T09:00:00Z

    def __call__(self) -> float:
        return self.now


def _call(body: dict) -> tuple[CallRecord, MeteredCall]:
    call = MeteredCall(perf_counter() - 0.5)
    call.model, call.request_body = body.get("model"), json.dumps(body).encode()
    rec = CallRecord("t", "proxy", "m", 200, "", 0.5, input_tokens=10, output_tokens=3, tokens_from_usage=True,
                     request_id="r")
    return rec, call


def _log(tmp_path, clock, **kw) -> tuple[CallLog, CollectorRegistry]:
    reg = CollectorRegistry()
    opts = CallLogOptions(tmp_path / "calls", **kw)
    return CallLog(opts, "http://up", reg, env={}, clock=clock), reg


def test_rotation_by_size_and_time_compresses_closed_files(tmp_path):
    clock = Clock()
    log, reg = _log(tmp_path, clock, rotate_bytes=1900, rotate_s=60)
    log._thread.start = lambda: None  # driven by hand: no thread, no timing
    log.start()
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 300}]}
    for _ in range(5):  # ~400 bytes each: the file passes 1900 bytes at the 5th
        log.submit(*_call(body), auth="Bearer k")
    log._drain()
    log._maintain(clock())
    files = sorted(p.name for p in (tmp_path / "calls").glob("calls-*"))
    assert files == ["calls-20261201T090000Z.jsonl.gz"]
    log.submit(*_call(body), auth="Bearer k")
    log._drain()
    clock.now += 30
    log._maintain(clock())  # not old enough yet
    assert len(list((tmp_path / "calls").glob("*.jsonl"))) == 1
    clock.now += 31
    log._maintain(clock())
    assert len(list((tmp_path / "calls").glob("*.jsonl"))) == 0
    assert len(read_log(tmp_path / "calls")) == 6
    assert reg.get_sample_value("opskit_call_log_records_total") == 6
    assert stat.S_IMODE(next((tmp_path / "calls").glob("*.gz")).stat().st_mode) == 0o600


def test_retention_and_disk_cap_delete_the_oldest_closed_files(tmp_path):
    clock = Clock()
    d = tmp_path / "calls"
    d.mkdir()
    for i, age_days in enumerate([100, 50, 10, 1]):
        p = d / f"calls-2026090{i}T000000Z.jsonl.gz"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (clock.now - age_days * 86400,) * 2)
    (d / "unrelated.txt").write_text("kept")
    log, _ = _log(tmp_path, clock, retention_days=90, max_bytes=2500)
    log._thread.start = lambda: None
    log.start()  # sweep: the 100-day file by age, the 50-day one by the cap (3000 > 2500)
    assert sorted(p.name for p in d.iterdir()) == [KEY_FILE, "calls-20260902T000000Z.jsonl.gz",
                                                   "calls-20260903T000000Z.jsonl.gz", "unrelated.txt"]


def test_a_full_queue_drops_and_counts_and_close_writes_the_rest(tmp_path, caplog):
    clock = Clock()
    log, reg = _log(tmp_path, clock, queue_size=3)
    for _ in range(10):  # the writer thread is not started yet: nothing drains
        log.submit(*_call({"model": "m", "messages": []}), auth=None)
    assert reg.get_sample_value("opskit_call_log_dropped_total", {"reason": "queue_full"}) == 7
    assert len([r for r in caplog.records if "queue full" in r.message]) == 1  # at most one line per 10 s
    log.start()
    log.close_sync()
    assert len(read_log(tmp_path / "calls")) == 3
    assert reg.get_sample_value("opskit_call_log_records_total") == 3
    assert reg.get_sample_value("opskit_call_log_dropped_total", {"reason": "write_error"}) == 0


def test_key_from_env_file_or_created(tmp_path):
    opts = CallLogOptions(tmp_path)
    assert load_key(opts, {"OPSKIT_CALL_LOG_KEY": "k1"}) == b"k1"
    made = load_key(opts, {})
    assert len(made) == 64 and load_key(opts, {}) == made  # created once, then reused
    (tmp_path / "other.key").write_text("k2\n")
    assert load_key(CallLogOptions(tmp_path, key_file=tmp_path / "other.key"), {}) == b"k2"


def test_prefix_hashes_are_chained_and_keyed():
    a = "A" * 256 + "B" * 256 + "C" * 100
    b = "A" * 256 + "X" * 256
    ha, hb = call_log_record.prefix_hashes(a, b"k"), call_log_record.prefix_hashes(b, b"k")
    assert len(ha) == 2 and len(hb) == 2 and ha[0] == hb[0] and ha[1] != hb[1]
    assert call_log_record.prefix_hashes(a, b"other")[0] != ha[0]
    # a later block equal to another prompt's later block: different hash, because the prefix differs
    assert call_log_record.prefix_hashes("Z" * 256 + "B" * 256, b"k")[1] != ha[1]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "ab"},
                                                        {"type": "image_url", "image_url": {"url": "u"}}]},
                          {"role": "assistant", "content": "cd"}]}
    assert call_log_record.prompt_text(parts) == "abcd"
    assert call_log_record.prompt_text({"prompt": ["x", "y"]}) == "xy"
    assert call_log_record.caller(None, b"k") is None and call_log_record.caller("Bearer s", b"k") != "Bearer s"


def test_a_failing_disk_is_counted_not_raised(tmp_path, caplog):
    import shutil

    clock = Clock()
    log, reg = _log(tmp_path, clock)
    log._thread.start = lambda: None
    log.start()
    shutil.rmtree(tmp_path / "calls")  # the directory is gone: opening the file fails
    for _ in range(3):
        log.submit(*_call({"model": "m", "messages": []}), auth=None)
    log._drain()
    assert reg.get_sample_value("opskit_call_log_dropped_total", {"reason": "write_error"}) == 3
    assert reg.get_sample_value("opskit_call_log_records_total") == 0
    assert [r.levelname for r in caplog.records if "not written" in r.message] == ["ERROR"]
    (tmp_path / "calls").mkdir()  # back: the next records are written
    log.submit(*_call({"model": "m", "messages": []}), auth=None)
    log._drain()
    assert reg.get_sample_value("opskit_call_log_records_total") == 1
