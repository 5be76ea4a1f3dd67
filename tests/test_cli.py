"""The `opskit` group itself: usage errors from any command print as one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

from opskit.cli import main

USAGE_ERRORS = [
    (["--no-such-flag"], "Error: No such option '--no-such-flag'."),
    (["nosuchcommand"], "Error: No such command 'nosuchcommand'."),
    (["loadtest", "--rate", "0"], "Error: Invalid value for '--rate': 0.0 is not in the range x>=0.01."),
    (["report", "compare", "/nonexistent-a", "/nonexistent-b"],
     "Error: Invalid value for 'BASE': Path '/nonexistent-a' does not exist."),
    (["report", "show"], "Error: Missing argument 'RUN'."),
    (["stack", "up", "--gpu", "nope"], "Error: Invalid value for '--gpu': 'nope' is not one of 'auto', 'fake', 'off'."),
    (["drill", "--rps", "0"], "Error: Invalid value for '--rps': 0.0 is not in the range 1<=x<=200."),
    (["exporter", "--upstream", "http://127.0.0.1:1"], "Error: --upstream needs --proxy-listen"),
    (["loadtest", "qps", "--target-name", "deepseek"],
     "Error: --target-name picks one of the targets of --config; give --config"),
    # nan passes click's range checks (it compares false with every bound) and inf passes a lower bound:
    # `--rate nan` hung the load test, `--duration inf` crashed it
    (["loadtest", "qps", "--rate", "nan"], "Error: Invalid value for '--rate': 'nan' is not a finite number."),
    (["loadtest", "--duration", "inf"], "Error: Invalid value for '--duration': 'inf' is not a finite number."),
    (["report", "compare", "/", "/", "--tolerance", "nan"],
     "Error: Invalid value for '--tolerance': 'nan' is not a finite number."),
    (["exporter", "--drain-s", "inf"], "Error: Invalid value for '--drain-s': 'inf' is not a finite number."),
    (["drill", "--rps", "nan"], "Error: Invalid value for '--rps': 'nan' is not a finite number."),
    # beyond what one Locust process generates: `--rate 1e12` never ended, `--users 1000000` still ran at 40 s
    (["loadtest", "qps", "--rate", "1e12", "--duration", "1"],
     "Error: --rate 1,000,000,000,000: one Locust process offers at most 2,500 req/s (bench/README.md), so 2,500 "
     "with --processes 1; more than one machine's 64 processes: use distributed Locust "
     "(deploy/locust-release-job.yaml, README: Load beyond one machine)"),
    (["loadtest", "qps", "--rate", "6000", "--processes", "2"],
     "Error: --rate 6,000: one Locust process offers at most 2,500 req/s (bench/README.md), so 5,000 with "
     "--processes 2; use --processes 3 (a core each) or distributed Locust (deploy/locust-release-job.yaml, "
     "README: Load beyond one machine)"),
    (["loadtest", "streaming", "conversation", "--users", "1000000", "--duration", "1"],
     "Error: --users 1,000,000: one Locust process runs at most 1,000 users (bench/README.md), so 1,000 with "
     "--processes 1; more than one machine's 64 processes: use distributed Locust (deploy/locust-release-job.yaml, "
     "README: Load beyond one machine)"),
]


@pytest.mark.parametrize(("args", "line"), USAGE_ERRORS)
def test_usage_errors_are_one_line_exit_2(args, line):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == line  # no "Usage: ..." block, no "Try ... --help" hint


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """Commands that ended in a traceback, with the one line each must print instead."""
    (tmp / "port.yaml").write_text("targets: [{name: a, base_url: 'http://127.0.0.1:99999'}]\n")
    (tmp / "v6.yaml").write_text("targets: [{name: a, base_url: 'http://[::1:8000'}]\n")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp / "a-file").write_text("not a directory\n")
    bad_port = "expected an http:// or https:// URL with a valid host and port (Port out of range 0-65535)"
    bad_v6 = "expected an http:// or https:// URL with a valid host and port (Invalid IPv6 URL)"
    exporter = ["exporter", "--no-gpu", "--listen", "127.0.0.1:0"]
    return [
        ([*exporter, "--proxy-listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:99999"],
         f"opskit: config error: --upstream: {bad_port}"),
        ([*exporter, "--proxy-listen", "127.0.0.1:0", "--upstream", "http://[::1"],
         f"opskit: config error: --upstream: {bad_v6}"),
        ([*exporter, "--config", str(tmp / "port.yaml")], f"opskit: config error: {tmp}/port.yaml: "
                                                          f"targets[0].base_url: {bad_port}"),
        ([*exporter, "--config", str(tmp / "v6.yaml")], f"opskit: config error: {tmp}/v6.yaml: "
                                                        f"targets[0].base_url: {bad_v6}"),
        ([*exporter, "--config", str(tmp / "binary.yaml")],
         f"opskit: config error: {tmp}/binary.yaml: expected a UTF-8 YAML text file (byte 128 is not UTF-8)"),
        (["loadtest", "qps", "--target", "http://127.0.0.1:99999", "--out", str(tmp / "reports")],
         f"opskit: config error: --target: {bad_port}"),
        (["stack", "up", "--state-dir", str(tmp / "a-file")],
         f"Error: Invalid value for '--state-dir': '{tmp}/a-file' exists and is not a directory"),
        (["stack", "status", "--state-dir", str(tmp / "a-file")],
         f"Error: Invalid value for '--state-dir': '{tmp}/a-file' exists and is not a directory"),
    ]


def test_bad_input_that_raised_tracebacks_is_one_line_exit_2(tmp_path):
    for args, line in _bad_inputs(tmp_path):
        result = CliRunner().invoke(main, args)
        assert (result.exit_code, result.output.strip()) == (2, line), args
    assert not (tmp_path / "reports").exists()  # the load test refused before it started anything


def test_a_bad_upstream_in_a_real_process_is_one_line_on_stderr():
    proc = subprocess.run([sys.executable, "-m", "opskit", "exporter", "--no-gpu", "--listen", "127.0.0.1:0",
                           "--proxy-listen", "127.0.0.1:0", "--upstream", "http://[::1"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.strip() == ("opskit: config error: --upstream: expected an http:// or https:// URL with a "
                                   "valid host and port (Invalid IPv6 URL)")


def test_bare_group_still_prints_its_help():
    result = CliRunner().invoke(main, ["report"])
    assert "compare" in result.output and "show" in result.output and "Error" not in result.output


def test_usage_error_in_a_real_process_is_one_line_on_stderr():
    proc = subprocess.run([sys.executable, "-m", "opskit", "loadtest", "--arrival", "burst"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("Error: Invalid value for '--arrival': 'burst' is not one of "
                                   "'fixed', 'poisson', 'ramp'.")
