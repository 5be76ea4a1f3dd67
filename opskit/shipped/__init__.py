"""The folders a user reads or edits, shipped inside the package.

`loadtests/`, `alerts/`, `dashboards/` and `deploy/` live at the top of a source checkout; the build
maps them to `opskit.shipped.<name>` (pyproject's package-dir), so an installed wheel carries them
and an editable install reads the checkout's own files. `folder(name)` is the one way to find them.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

NAMES = ("loadtests", "alerts", "dashboards", "deploy")


def folder(name: str) -> Path:
    """The directory of a shipped folder (e.g. `folder("alerts")`), wherever opskit is installed."""
    if name not in NAMES:
        raise ValueError(f"no shipped folder {name!r}; one of {', '.join(NAMES)}")
    return Path(str(files(f"opskit.shipped.{name}")))
