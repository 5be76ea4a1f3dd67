"""`opskit stack up|down|status`: the whole monitoring loop on loopback ports.

    receiver <── Alertmanager <── Prometheus ──scrape──> exporter (proxy, probe, GPU) ──> mock or target

`up` starts each part detached (its own process group, logs under the state dir), waits until each
is ready (Prometheus until its first scrape of the exporter succeeded) and records them in
`<state dir>/state.json`; it returns while they keep running. A second `up` while the stack runs
starts nothing, prints the status and exits 0. `down` stops every process group it recorded, so
nothing is left running; `status` shows each part, its pid and URL, and exits 1 when any is down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from opskit.core import processes
from opskit.core.processes import Child, SuperviseError
from opskit.live import stack_config
from opskit.live.stack_config import Timing
from opskit.shipped import folder

DEFAULT_STATE_DIR = ".stack"
PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"
GPU_MODES = ("auto", "fake", "off")


class StackError(Exception):
    """The stack could not be brought up or down; the message is one line."""


class AlreadyUp(StackError):
    """`up` found the stack of this state dir running."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        super().__init__(f"stack already up (state dir {stack.state_dir}); `opskit stack down` stops it")


@dataclass
class StackSpec:
    """What to start. `rules` maps file name -> rule file text (None: the project's alerts/)."""

    state_dir: Path
    config: str | None = None          # opskit config naming a real target
    target: str | None = None          # or a real target's URL
    timing: Timing = field(default_factory=Timing)
    probe_interval_s: float = 15.0
    rules: dict[str, str] | None = None
    alertmanager_yml: str | None = None  # None: the project's alerts/alertmanager.yml, else a plain route
    gpu: str = "auto"                  # auto: NVML if the driver is there; fake: tests' fake NVML; off
    fake_dcgm: bool = False            # with gpu fake: a fake dcgm-exporter on the same GPUs, scraped too
    models: tuple[str, ...] = ("deepseek-chat", "deepseek-reasoner")
    daily_quota_requests: int = 100000
    mock_flags: tuple[str, ...] = ()
    engine: str | None = None          # the mock plays this model server (vllm, sglang, tgi), scraped too
    probe: bool = True                 # canary calls from the exporter (they cost money on a hosted API)
    spend_daily_budget: float | None = None  # the mock target's daily budget (USD): arms LLMSpendBudgetBurn
    ready_timeout_s: float = 60.0


@dataclass
class Component:
    """A running part of the stack: the process and the URLs it serves."""

    child: Child
    urls: dict[str, str]

    def to_json(self) -> dict:
        """As recorded in state.json."""
        return {**self.child.to_json(), "urls": self.urls}

    @classmethod
    def from_json(cls, d: dict) -> Component:
        """From a state.json entry."""
        urls = d.pop("urls", {})
        return cls(Child(**d), urls)


@dataclass
class Stack:
    """A started stack, as recorded in state.json."""

    state_dir: Path
    components: list[Component]
    files: dict[str, str]

    def url(self, name: str, key: str = "url") -> str:
        """A component's URL (`url`, or e.g. `proxy_url`, `admin_url`)."""
        for c in self.components:
            if c.child.name == name:
                return c.urls[key]
        raise KeyError(name)

    def save(self) -> None:
        """Write state.json atomically."""
        data = {"components": [c.to_json() for c in self.components], "files": self.files}
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_dir / "state.json")

    @classmethod
    def load(cls, state_dir: Path) -> Stack | None:
        """The stack recorded in `state_dir`, or None when there is none."""
        try:
            data = json.loads((state_dir / "state.json").read_text())
            comps = [Component.from_json(dict(c)) for c in data["components"]]
        except FileNotFoundError:
            return None
        except OSError as exc:  # not a directory, unreadable: one line, not a traceback
            raise StackError(f"cannot read {state_dir}/state.json: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise StackError(f"{state_dir}/state.json is damaged ({exc.__class__.__name__}); "
                             f"stop its processes by hand and remove it") from None
        return cls(state_dir, comps, data.get("files", {}))


def _binary(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise StackError(f"{name} not found on PATH (make install installs it from Debian)")
    return path


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


class _Starter:
    """Starts components one by one, remembering them so a failure can stop what already runs."""

    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.dir = spec.state_dir
        self.components: list[Component] = []
        self.files: dict[str, str] = {}

    def with_ready_file(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> dict:
        ready = self.dir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        comp, proc = self._spawn(name, [*argv, "--ready-file", str(ready)], {}, env=env)
        info = processes.wait_ready_file(comp.child, proc, ready, self.spec.ready_timeout_s)
        comp.urls = {k: v for k, v in info.items() if k.endswith("url") and isinstance(v, str)}
        return info

    def with_port(self, name: str, argv_for, ready_path: str, attempts: int = 3) -> str:
        """Start a binary that must be given its port (`argv_for(port)`), retrying on a port taken
        between our probe and its bind (other tests and stacks pick ports concurrently)."""
        for attempt in range(attempts):
            port = processes.free_port()
            url = f"http://127.0.0.1:{port}"
            comp, proc = self._spawn(name, argv_for(port), {"url": url}, cwd=self.dir)
            try:
                processes.wait_http(comp.child, proc, url + ready_path, self.spec.ready_timeout_s)
                return url
            except SuperviseError as exc:
                if "address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                processes.stop(comp.child)  # stopped before it is forgotten, so an interruption cannot leak it
                self.components.remove(comp)
        raise AssertionError("unreachable")

    def _spawn(self, name: str, argv: list[str], urls: dict[str, str], **kw) -> tuple[Component, subprocess.Popen]:
        """Start a component and record it in one step that SIGTERM cannot split: a child started (in
        its own session) but not yet recorded would outlive an interrupted `up`, as the mock did."""
        with processes.signals_held():
            child, proc = processes.spawn(name, argv, self.dir / "logs" / f"{name}.log", **kw)
            comp = Component(child, urls)
            self.components.append(comp)
        return comp, proc

    def stop_all(self) -> None:
        """Stop every component started so far, last first; a second SIGTERM waits until they are down."""
        with processes.signals_held():
            for comp in reversed(self.components):
                processes.stop(comp.child)


# Illustrative prices for the embedded mock (per million tokens), so the stack's Spend panels and the
# spend alert have data; a real target's prices come from its own config, never from here.
MOCK_PRICES = {"currency": "USD", "per_million_tokens": {
    m: {"input": 0.1, "cached_input": 0.02, "output": 0.4} for m in ("deepseek-chat", "deepseek-reasoner")}}


def _exporter_config(spec: StackSpec, mock_url: str) -> str:
    """The exporter's config for the mock target: its models, a daily quota, a fast probe."""
    import yaml

    return yaml.safe_dump({
        "targets": [{"name": "mock", "base_url": mock_url + "/v1", "kind": "private",
                     "models": list(spec.models), "daily_quota_requests": spec.daily_quota_requests,
                     "prices": {**MOCK_PRICES, **({"daily_budget": spec.spend_daily_budget}
                                                  if spec.spend_daily_budget else {})}}],
        "probe": {"interval_s": spec.probe_interval_s, "timeout_s": 5.0, "max_tokens": 8},
    }, sort_keys=False)


def _start_target(st: _Starter) -> tuple[list[str], dict[str, str]]:
    """Start the mock unless a real target is configured: (exporter flags, its environment).

    The proxy forwards to the first configured target's base URL, so proxy and probe series share
    that target's name; a client calls the proxy as it would call the target's API root.
    """
    spec, env = st.spec, dict(os.environ)
    if spec.config or spec.target:
        return [*(["--config", spec.config] if spec.config else []),
                *(["--target", spec.target] if spec.target else [])], env
    engine = ["--engine", spec.engine] if spec.engine else []
    info = st.with_ready_file("mock", _python("-m", "opskit", "mock", "--listen", "127.0.0.1:0", *engine,
                                              *spec.mock_flags))
    if spec.engine:
        st.files["engine_url"] = info["url"]
    path = st.dir / "exporter.yaml"
    path.write_text(_exporter_config(spec, info["url"]))
    st.files["exporter_config"] = str(path)
    return ["--config", str(path)], env


def nvml_present() -> bool:
    """True when the dynamic loader finds libnvidia-ml.so.1 (a machine with an NVIDIA driver)."""
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def _gpu_flags(st: _Starter, env: dict[str, str]) -> list[str]:
    """Exporter flags (and env) for the GPU mode; `fake` loads the tests' fake libnvidia-ml, and
    `auto` without NVML turns GPU series off (else the GPU-missing alert would fire, rightly)."""
    if st.spec.gpu == "off" or st.spec.gpu == "auto" and not nvml_present():
        return ["--no-gpu"]
    if st.spec.gpu == "fake":
        from opskit.live import fake_gpu

        lib_dir, state = fake_gpu.prepare(st.dir / "fakenvml")
        env["LD_LIBRARY_PATH"] = f"{lib_dir}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(lib_dir)
        env[fake_gpu.STATE_ENV] = str(state)
        st.files["fake_nvml_state"] = str(state)
        if st.spec.fake_dcgm:
            st.files["dcgm_url"] = st.with_ready_file("dcgm-exporter", _python(
                "-m", "opskit.live.fake_dcgm", "--state", str(state), "--listen", "127.0.0.1:0",
                *fake_gpu.DCGM_FLAGS))["url"]
    return ["--gpu"]


def _write_rules(spec: StackSpec) -> list[str]:
    rules_dir = spec.state_dir / "rules"
    shutil.rmtree(rules_dir, ignore_errors=True)
    rules_dir.mkdir(parents=True)
    rules = spec.rules
    if rules is None:
        rules = {p.name: p.read_text() for p in sorted(folder("alerts").glob("*.rules.yml"))}
    for name, text in rules.items():
        (rules_dir / name).write_text(text)
    return [str(rules_dir / name) for name in rules]


def _alertmanager_text(spec: StackSpec, receiver_url: str) -> str:
    if spec.alertmanager_yml is not None:
        return stack_config.retime_alertmanager(spec.alertmanager_yml, receiver_url, spec.timing)
    project = folder("alerts") / "alertmanager.yml"
    if project.exists():
        return stack_config.retime_alertmanager(project.read_text(), receiver_url, spec.timing)
    return stack_config.alertmanager_yml(receiver_url, spec.timing)


def _start_all(st: _Starter) -> None:
    spec, d = st.spec, st.dir
    prom_bin, am_bin = _binary(PROMETHEUS), _binary(ALERTMANAGER)
    out = d / "notifications.jsonl"
    out.unlink(missing_ok=True)
    st.files["notifications"] = str(out)
    rx = st.with_ready_file("receiver", _python("-m", "opskit.live.alert_receiver", "--listen", "127.0.0.1:0", "--out", str(out)))
    flags, env = _start_target(st)
    flags += _gpu_flags(st, env)
    exp = st.with_ready_file("exporter", _python(
        "-m", "opskit", "exporter", "--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0",
        *(["--probe"] if spec.probe else []), *flags), env=env)
    am_yml = d / "alertmanager.yml"
    am_yml.write_text(_alertmanager_text(spec, rx["url"] + "/alerts"))
    am_url = st.with_port("alertmanager", lambda port: [
        am_bin, f"--config.file={am_yml}", f"--storage.path={d / 'alertmanager-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"], "/-/ready")
    prom_yml = d / "prometheus.yml"
    prom_yml.write_text(stack_config.prometheus_yml(exp["url"], am_url, _write_rules(spec), spec.timing,
                                                    st.files.get("engine_url"), st.files.get("dcgm_url")))
    prom_url = st.with_port("prometheus", lambda port: [
        prom_bin, f"--config.file={prom_yml}", f"--storage.tsdb.path={d / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
        "--storage.tsdb.retention.time=1d", "--log.level=warn"], "/-/ready")
    st.files.update(prometheus_config=str(prom_yml), alertmanager_config=str(am_yml))
    wait_scraped(prom_url, spec.ready_timeout_s)


def query(prom_url: str, promql: str, timeout: float = 5.0) -> list[dict]:
    """An instant query's result vector (raises StackError on an API error)."""
    url = f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise StackError(f"query {promql!r} failed: {exc}") from None
    if body.get("status") != "success":
        raise StackError(f"query {promql!r}: {body.get('error', 'error')}")
    return body["data"]["result"]


def wait_scraped(prom_url: str, timeout: float) -> None:
    """Wait until Prometheus has scraped the exporter successfully (its first scrape takes ~5 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["value"][1] == "1" for r in query(prom_url, f'up{{job="{stack_config.SCRAPE_JOB}"}}')):
            return
        time.sleep(0.2)
    raise StackError(f"Prometheus at {prom_url} has not scraped the exporter within {timeout:.0f}s")


def running(state_dir: Path) -> Stack | None:
    """The recorded stack when at least one of its processes is still running."""
    stack = Stack.load(state_dir)
    if stack and any(processes.alive(c.child) for c in stack.components):
        return stack
    return None


def up(spec: StackSpec) -> Stack:
    """Start every component; on any failure stop what was started and raise StackError."""
    # the components run with the source root as their working directory: paths given relative to
    # the caller's (the default .stack, a --config file) must not be resolved against it
    spec = replace(spec, state_dir=spec.state_dir.absolute(),
                   config=os.path.abspath(spec.config) if spec.config else None)
    spec.timing.check()
    if spec.gpu not in GPU_MODES:
        raise StackError(f"--gpu: expected one of {', '.join(GPU_MODES)}, got {spec.gpu!r}")
    if existing := running(spec.state_dir):
        raise AlreadyUp(existing)
    if spec.config or spec.target:
        from opskit.core import config as cfgmod

        cfgmod.load(spec.config, spec.target).target()  # ConfigError (exit 2) before anything starts
    try:
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        (spec.state_dir / "state.json").unlink(missing_ok=True)
    except OSError as exc:  # a file in the way, no permission
        raise StackError(f"cannot use the state dir {spec.state_dir}: {exc.strerror or exc}") from None
    st = _Starter(spec)
    try:
        _start_all(st)
    except BaseException as exc:
        st.stop_all()
        from opskit.live.fake_gpu import FakeGpuUnavailable

        if isinstance(exc, SuperviseError | FakeGpuUnavailable | ValueError | OSError):
            raise StackError(str(exc)) from None
        raise
    stack = Stack(spec.state_dir, st.components, st.files)
    stack.save()
    return stack


def down(state_dir: Path) -> list[str]:
    """Stop every recorded component (last started first); the names of those that were running."""
    stack = Stack.load(state_dir)
    if stack is None:
        return []
    stopped = [c.child.name for c in reversed(stack.components) if processes.stop(c.child)]
    (state_dir / "state.json").unlink(missing_ok=True)
    return stopped


def status_lines(stack: Stack) -> tuple[list[str], bool]:
    """One line per component (name, state, pid, URLs) and whether all of them run."""
    lines, all_up = [], True
    for c in stack.components:
        ok = processes.alive(c.child)
        all_up &= ok
        urls = "  ".join(f"{k}={v}" for k, v in sorted(c.urls.items()))
        lines.append(f"{c.child.name:<13}{'running' if ok else 'DOWN':<9}pid {c.child.pid:<8}{urls}")
    return lines, all_up
