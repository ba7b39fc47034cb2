"""runctl's own log lines in a user's program: structlog's defaults (the program did not
configure it), each line written whole, so the agent's thread never cuts a line in two
around the program's own print()."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import ROOT

PROGRAM = """
import io, json, sys
from pydantic import BaseModel
from runctl import control

class Recorder(io.TextIOBase):
    def __init__(self) -> None:
        self.writes: list[str] = []
    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

class S(BaseModel):
    x: int = 0

recorder, real = Recorder(), sys.stdout
sys.stdout = recorder
with control(S(), run=sys.argv[1], rank=0, url=sys.argv[2]) as ctl:
    ctl.wait_ready(30)
sys.stdout = real
print(json.dumps(recorder.writes))
"""


def test_an_agent_log_line_is_written_in_one_piece(nats_url: str, run_id: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROGRAM), run_id, nats_url],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    writes: list[str] = json.loads(out.stdout.splitlines()[-1])
    (ready,) = [w for w in writes if "agent ready" in w]
    assert ready.endswith("\n") and ready.count("\n") == 1, writes
