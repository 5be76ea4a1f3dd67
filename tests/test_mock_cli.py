"""`opskit mock` as a command: flag errors, the ready file, signals; and pure units (model, limits)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import ROOT

from opskit.cli import main
from opskit.mock.latency_model import CONTENT, REASONING, LatencyModel, plan_chunks
from opskit.mock.limits import Gate, RateLimiter
from opskit.mock.settings import Latency, Limits

BAD_FLAGS = [
    (["--listen", "nowhere"], "--listen"),
    (["--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0"], "loopback"),
    (["--listen", "127.0.0.1:0", "--error-rate", "404=0.1"], "error-rate"),
    (["--listen", "127.0.0.1:0", "--error-rate", "500"], "STATUS=RATE"),
    (["--listen", "127.0.0.1:0", "--hang-rate", "1.5"], "hang-rate"),
    (["--listen", "127.0.0.1:0", "--capacity", "0"], "capacity"),
    (["--listen", "127.0.0.1:0", "--auth", "bearer"], "--api-key"),
    (["--listen", "127.0.0.1:0", "--auth", "hmac", "--api-key", "no-colon"], "KEYID:SECRET"),
    (["--listen", "127.0.0.1:0", "--auth", "oauth2"], "--client"),
    (["--listen", "127.0.0.1:0", "--ttft-ms", "fast"], "ttft-ms"),
    (["--listen", "127.0.0.1:0", "--rate-window-s", "0"], "--rate-window-s: expected a number >= 0.001"),
    (["--listen", "127.0.0.1:0", "--rpm", "0"], "--rpm: expected an integer >= 1, got 0"),
    (["--listen", "127.0.0.1:0", "--ttft-ms", "inf"], "--ttft-ms: expected a number >= 0, got inf"),
    (["--listen", "127.0.0.1:0", "--hang-rate", "nan"], "--hang-rate: expected a number between 0 and 1, got nan"),
    (["--listen", "127.0.0.1:0", "--no-such-flag"], "no-such-flag"),
    # nan passed the `<= 0` check and every token request then answered 500
    (["--listen", "127.0.0.1:0", "--auth", "oauth2", "--client", "a:b", "--token-ttl-s", "nan"],
     "--token-ttl-s: expected a finite number > 0, got nan"),
    (["--listen", "127.0.0.1:0", "--token-ttl-s", "inf"], "--token-ttl-s: expected a finite number > 0, got inf"),
    # a name that merely starts with 127. is not loopback (the check was a string prefix test)
    (["--listen", "127.0.0.1:0", "--admin-listen", "127.x.example:0"], "loopback-only"),
    (["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1.example:0"], "loopback-only"),
]


@pytest.mark.parametrize(("args", "mention"), BAD_FLAGS)
def test_bad_flags_one_line_exit_2(args, mention, clean_env):
    result = CliRunner().invoke(main, ["mock", *args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and mention in lines[0]
    assert "Traceback" not in result.output


def test_listen_addresses_read_as_the_exporter_reads_them():
    from opskit.mock.cli import parse_hostport

    assert parse_hostport("127.0.0.1:8000", "--listen") == ("127.0.0.1", 8000)
    assert parse_hostport("[::1]:0", "--listen") == ("::1", 0)
    assert parse_hostport(":8000", "--listen") == ("0.0.0.0", 8000)  # all interfaces, like --listen :9464
    result = CliRunner().invoke(main, ["mock", "--listen", "127.0.0.1:0", "--admin-listen", ":0"])
    assert result.exit_code == 2 and "loopback-only" in result.output  # the admin API still may not


def test_secret_never_in_flag_errors(clean_env):
    result = CliRunner().invoke(main, ["mock", "--listen", "127.0.0.1:0", "--auth", "oauth2",
                                       "--client", "app:sup3rsecret", "--client", "broken"])
    assert result.exit_code == 2 and "sup3rsecret" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ready_file_and_clean_exit_on_signal(start_mock, sig):
    mock = start_mock()
    assert mock.url.startswith("http://127.0.0.1:") and mock.admin_url.startswith("http://127.0.0.1:")
    mock.proc.send_signal(sig)
    assert mock.proc.wait(10) == 0


@pytest.mark.slow
def test_port_in_use_is_one_line_exit_1():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "opskit", "mock", "--listen", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "cannot listen" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "opskit", "mock", "--listen", "127.0.0.1:0", "--ready-file",
                           "/nonexistent-dir/ready.json"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: cannot write the ready file")


def test_model_same_seed_same_schedule_and_bounds():
    lat = Latency(ttft_ms=20, ttft_jitter_ms=5, itl_ms=3, itl_jitter_ms=1, output_tokens_mean=30,
                  output_tokens_spread=50)
    a, b = LatencyModel(lat, seed=5), LatencyModel(lat, seed=5)
    for _ in range(50):
        sa, sb = a.sample(2, 40, 0.0), b.sample(2, 40, 0.0)
        ta = list(sa.times())
        assert (ta, sa.lengths, sa.word_offset) == (list(sb.times()), sb.lengths, sb.word_offset)
        assert all(1 <= n <= 40 for n in sa.lengths) and sa.ttft >= 0
        assert ta == sorted(ta) and len(ta) == max(sa.lengths) and sa.end == ta[-1]


def test_chunk_plans_and_itl_per_token():
    assert plan_chunks(5, 2, False) == [(CONTENT, 0, 2), (CONTENT, 2, 2), (CONTENT, 4, 1)]
    assert plan_chunks(5, 2, True) == [(REASONING, 0, 2), (CONTENT, 2, 2), (CONTENT, 4, 1)]
    assert plan_chunks(1, 4, True) == [(CONTENT, 0, 1)]
    lat = Latency(ttft_ms=10, ttft_jitter_ms=0, itl_ms=4, itl_jitter_ms=0, output_tokens_mean=5,
                  output_tokens_spread=0, tokens_per_chunk=2)
    s = LatencyModel(lat, seed=1).sample(1, None, extra_ttft_ms=7)
    # chunk j is due ITL x (tokens in chunk j) after chunk j-1; extra TTFT shifts everything
    assert list(s.times()) == pytest.approx([0.017, 0.025, 0.029]) and s.end == pytest.approx(0.029)
    for reasoning in (False, True):   # the lazy chunk arithmetic agrees with the plan
        r = LatencyModel(Latency(tokens_per_chunk=3), seed=2).sample(3, None, 0.0, reasoning=reasoning)
        for c in range(3):
            plan = plan_chunks(r.lengths[c], 3, reasoning)
            assert [r.chunk(c, j) for j in range(r.chunks(c))] == plan


def test_rate_limiter_fixed_window_with_fake_clock():
    now = [100.0]
    rl = RateLimiter(Limits(rpm=2, tpm=None, window_s=10), clock=lambda: now[0], wall=lambda: 0.0)
    assert rl.check("k", 1).allowed and rl.check("k", 1).allowed
    refused = rl.check("k", 1)
    assert not refused.allowed and refused.retry_after == 10 and refused.which == "requests"
    now[0] += 9.5
    assert rl.check("k", 1).retry_after == 1
    now[0] += 0.5
    ok = rl.check("k", 1)
    assert ok.allowed and ok.headers["x-ratelimit-remaining-requests"] == "1"


def test_gate_is_fifo_and_survives_cancelled_waiters():
    async def run():
        gate, order = Gate(1), []
        await gate.acquire()

        async def worker(i):
            await gate.acquire()
            order.append(i)
            gate.release()

        tasks = [asyncio.create_task(worker(i)) for i in range(4)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        gate.release()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        return order, gate.held

    order, held = asyncio.run(run())
    assert order == [0, 2, 3] and held == 0


@pytest.mark.slow
def test_sigterm_with_a_stream_in_flight_exits_0_promptly(start_mock):
    import http.client
    import json
    import time
    mock = start_mock("--ttft-ms", "1", "--itl-ms", "50", "--output-tokens-mean", "1000")
    host, port = mock.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "deepseek-chat", "stream": True,
                                                              "messages": [{"role": "user", "content": "x"}]}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read1(100)
    t0 = time.monotonic()
    mock.proc.send_signal(signal.SIGTERM)
    assert mock.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    conn.close()


def test_apply_stop_keeps_whole_words_before_the_match():
    lat = Latency(output_tokens_mean=10, output_tokens_spread=0, ttft_jitter_ms=0, itl_jitter_ms=0)
    s = LatencyModel(lat, seed=3).sample(2, None, 0.0, reasoning=True)    # 5 reasoning + 5 content each
    content = s.text(0, CONTENT)
    stop = content.split(" ")[4][1:]                    # starts inside the 4th word (content is " w1 w2 ...")
    s.apply_stop(("\u2603", stop))                       # the first never matches
    assert s.stopped[0] and s.reasoning == [5, 5]
    kept, cut = s.text(0, CONTENT), content.find(stop)
    assert kept == content[: content.rfind(" ", 0, cut)]   # the words that end before the match
    assert stop not in kept and s.lengths[0] == 5 + len(kept.split())
    assert s.end == pytest.approx(list(s.times())[-1])
