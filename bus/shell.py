"""How to type ``runctl`` here so that a printed command runs as printed.

The demo's instructions and the line ``control()`` prints tell a user what to type next.
In a fresh clone the ``runctl`` script lives in ``.venv/bin`` and the shell does not find
it unless the venv is activated: such lines say ``.venv/bin/runctl`` then.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

__all__ = ["runctl_command"]


def runctl_command() -> str:
    """``runctl`` when the shell finds this environment's script by that name, else the
    script's path (relative to the working directory when inside it: ``.venv/bin/runctl``),
    else ``python -m runctl`` with this interpreter."""
    script = Path(sys.executable).parent / "runctl"
    found = shutil.which("runctl")
    if found is not None and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "runctl"
    if script.exists():
        return _short(script)
    return f"{_short(Path(sys.executable))} -m runctl"


def _short(path: Path) -> str:
    absolute = path.absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)
