"""What `opskit stack up` prints to paste: the client's settings and the pages to open, and where the
last `stack up` put its state (so `status` and `down` find a stack started with --state-dir).

One rule for the proxy URL, everywhere: the metering proxy stands for its upstream, so a client that
would call `<upstream>/chat/completions` calls `<proxy_url>/chat/completions`. The stack's upstream is
the target's API root (the mock's `/v1`), so `OPENAI_BASE_URL=<proxy_url>`, with nothing added:
`<proxy_url>/v1` would reach the target as `/v1/v1/...`, a 404.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path


def prometheus_ui(prom_url: str, timeout: float = 2.0) -> str:
    """The prefix of Prometheus's UI pages: "" for the React UI, "/classic" where only the classic UI
    is served (Debian's Prometheus 2.42 is built without the React assets: /alerts is a 404 there)."""
    for prefix in ("", "/classic"):
        try:
            with urllib.request.urlopen(f"{prom_url}{prefix}/alerts", timeout=timeout) as resp:
                if resp.status == 200:
                    return prefix
        except (OSError, ValueError):
            continue
    return ""


def settings_lines(urls: dict[str, dict[str, str]]) -> list[str]:
    """Ready-to-paste lines from the components' URLs ({component: {key: url}})."""
    exporter, prom, am = urls.get("exporter", {}), urls.get("prometheus", {}).get("url"), \
        urls.get("alertmanager", {}).get("url")
    lines = ["", "# paste into a shell: the proxy URL is the target's API root (nothing to add, not even /v1)"]
    if exporter.get("proxy_url"):
        lines += [f"export OPENAI_BASE_URL={exporter['proxy_url']}",
                  "export OPENAI_API_KEY=...   # your key for a real target; any value for the mock"]
    if exporter.get("url"):
        lines.append(f"# exporter metrics: {exporter['url']}/metrics")
    if prom:
        ui = prometheus_ui(prom)
        lines.append(f"# Prometheus: {prom}{ui}/alerts  {prom}{ui}/graph  {prom}{ui}/targets")
    if am:
        lines.append(f"# Alertmanager: {am}/#/alerts")
    return lines


def _pointer() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "opskit" / "last-stack-dir"


def remember(state_dir: Path) -> None:
    """Note the state dir of the stack just started (best effort: a read-only home is no error)."""
    try:
        p = _pointer()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(str(state_dir.resolve()) + "\n")
    except OSError:
        pass


def last() -> Path | None:
    """The state dir of the last `stack up`, if it still holds a state file."""
    try:
        d = Path(_pointer().read_text().strip())
    except OSError:
        return None
    return d if d.is_absolute() and (d / "state.json").is_file() else None


def forget(state_dir: Path) -> None:
    """Drop the note when that stack is stopped."""
    try:
        if _pointer().read_text().strip() == str(state_dir.resolve()):
            _pointer().unlink()
    except OSError:
        pass
