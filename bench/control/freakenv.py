"""Freak's own venv: ``freak==0.0.2`` only works with the lock it was released with.

Created once in ``bench/.venvs/freak`` (git-ignored) with the ordinary ``pip`` client and
reused while its marker file names the same lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path
from typing import Final

__all__ = ["FREAK_LOCK", "VENVS", "ensure", "freeze", "python_of"]

FREAK_LOCK: Final = (
    "freak==0.0.2",
    "fastapi==0.95.0",
    "pydantic==1.10.7",
    "starlette==0.26.1",
    "uvicorn==0.21.1",
)
VENVS: Final = Path(__file__).resolve().parent.parent / ".venvs"
_MARKER: Final = "runctl-bench-lock.json"


def python_of(root: Path) -> Path:
    return root / "bin" / "python"


def is_ready(root: Path = VENVS / "freak") -> bool:
    marker = root / _MARKER
    try:
        return python_of(root).exists() and json.loads(marker.read_text()) == list(FREAK_LOCK)
    except (OSError, ValueError):
        return False


def ensure(root: Path = VENVS / "freak", *, quiet: bool = True) -> Path:
    """The venv's python, creating the venv (about 10 s, needs PyPI) if needed."""
    if is_ready(root):
        return python_of(root)
    print(f"creating Freak's venv in {root} ({' '.join(FREAK_LOCK)})", file=sys.stderr)
    venv.EnvBuilder(clear=True, with_pip=True).create(root)
    cmd = [
        str(python_of(root)),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        *(["-q"] if quiet else []),
        *FREAK_LOCK,
    ]
    subprocess.run(cmd, check=True)
    subprocess.run([str(python_of(root)), "-c", "import freak, fastapi, uvicorn"], check=True)
    (root / _MARKER).write_text(json.dumps(list(FREAK_LOCK)))
    return python_of(root)


def freeze(python: Path) -> dict[str, str]:
    """Installed distributions of an environment, for the results file."""
    code = (
        "import json, importlib.metadata as m; print(json.dumps({d.metadata['Name'].lower():"
        " d.version for d in m.distributions()}))"
    )
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    versions: dict[str, str] = json.loads(out.stdout)
    return dict(sorted(versions.items()))
