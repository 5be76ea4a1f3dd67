"""opskit as a package: the sdist and wheel build, the wheel runs from an empty directory with no checkout
in sight (scenarios, rules, dashboards and manifests ship inside it), and the floor plan holds (flows
import the floor, commands never import the CLI group, no module over 400 lines)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

PKG = ROOT / "opskit"
FLOWS = ("sidecar", "loadtest", "opscode", "live", "mock")
# The documented entry points one flow may import from another (README, "Layout").
ENTRY_POINTS = {
    "live": {"opskit.opscode.rules_file", "opskit.opscode.routing", "opskit.opscode.dashboards"},
}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("opskit")}


def test_pyproject_lists_every_package_and_maps_the_shipped_folders():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    shipped = {f"opskit.shipped.{name}": name for name in ("loadtests", "alerts", "dashboards", "deploy")}
    assert set(conf["packages"]) == on_disk | set(shipped)
    assert conf["package-dir"] == shipped


def test_flows_import_the_floor_not_each_other():
    bad = []
    for name, path in _modules().items():
        parts = name.split(".")
        for imp in _imports(path):
            target = imp.split(".")
            if len(target) < 2 or target[1] in ("__version__",):
                continue
            if parts[1] == "core" and target[1] in FLOWS:
                bad.append(f"{name} (the floor) imports {imp}")
            elif (parts[1] in FLOWS and target[1] in FLOWS and target[1] != parts[1]
                  and not any(imp == e or imp.startswith(e + ".") for e in ENTRY_POINTS.get(parts[1], ()))):
                bad.append(f"{name} imports {imp}")
            if target[1] == "cli" and name != "opskit.__main__":
                bad.append(f"{name} imports the CLI group")
    assert not bad, "\n".join(bad)



def test_no_module_over_400_lines():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_nothing_reads_the_checkout_at_run_time():
    pattern = re.compile(r"sys\.path\.(append|insert)|parent\.parent|__file__\)\.resolve\(\)\.parents?\[")
    hits = [f"{name}: {m.group(0)}" for name, p in _modules().items() if (m := pattern.search(p.read_text()))]
    assert not hits, hits


def _fresh_venv(tmp: Path) -> Path:
    """A new virtualenv outside the checkout whose dependencies are this venv's site-packages (as a
    plain path: no .pth of it runs, so the editable opskit stays invisible); opskit comes from the wheel."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True, timeout=120)
    site = next((tmp / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return tmp / "bin"


@pytest.mark.slow
def test_the_wheel_runs_from_an_empty_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("opskit-*.whl")
    assert list(dist.glob("opskit-*.tar.gz"))  # built first; the wheel is built from it
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("opskit/shipped/loadtests/qps.py", "opskit/shipped/loadtests/slo.yaml",
                    "opskit/shipped/alerts/opskit.rules.yml", "opskit/shipped/alerts/tests/slo.test.yml",
                    "opskit/shipped/alerts/dcgm/opskit.rules.yml",
                    "opskit/shipped/dashboards/llm_api.dashboard.py", "opskit/shipped/dashboards/generated/gpu.json",
                    "opskit/shipped/deploy/generated/prometheusrule.yaml", "opskit/live/fakenvml/fake_nvml.c"):
        assert shipped in names, shipped
    assert not [n for n in names if n.startswith("tests/")]

    bin_dir = _fresh_venv(tmp_path / "venv")
    py = str(bin_dir / "python")
    # the fresh interpreter runs pip (importable through deps.pth), so the scripts name that interpreter;
    # --ignore-installed, or pip would uninstall the editable opskit it sees through deps.pth
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--ignore-installed", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPSKIT_THRESHOLDS", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"

    def opskit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / "opskit"), *args], cwd=empty, env=env, capture_output=True,
                              text=True, timeout=timeout)

    where = subprocess.run([py, "-c", "import opskit; print(opskit.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(tmp_path / "venv")), (where.stdout, where.stderr)
    for what, more in (("alerts", ()), ("dashboards", ()),
                       ("manifests", ("--runbook-base", "https://runbooks.example.com/opskit/alerts/runbook.md"))):
        res = opskit("generate", what, "--check", *more)
        assert res.returncode == 0 and "up to date" in res.stdout, (what, res.stdout, res.stderr)
    run = opskit("loadtest", "qps", "--duration", "5", "--out", str(empty / "reports"), timeout=180)
    assert run.returncode == 0 and "VERDICT: PASS" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    if shutil.which("prometheus") and shutil.which("prometheus-alertmanager"):
        drill = opskit("drill", "--phase", "errors", timeout=240)
        assert drill.returncode == 0, drill.stdout[-3000:] + drill.stderr[-2000:]
    assert sorted(p.name for p in empty.iterdir()) == ["reports"]  # nothing else written where it ran
