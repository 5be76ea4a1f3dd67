"""The `opskit` group itself: usage errors from any command print as one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

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
]


@pytest.mark.parametrize(("args", "line"), USAGE_ERRORS)
def test_usage_errors_are_one_line_exit_2(args, line):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == line  # no "Usage: ..." block, no "Try ... --help" hint


def test_bare_group_still_prints_its_help():
    result = CliRunner().invoke(main, ["report"])
    assert "compare" in result.output and "show" in result.output and "Error" not in result.output


def test_usage_error_in_a_real_process_is_one_line_on_stderr():
    proc = subprocess.run([sys.executable, "-m", "opskit", "loadtest", "--arrival", "burst"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("Error: Invalid value for '--arrival': 'burst' is not one of "
                                   "'fixed', 'poisson', 'ramp'.")
