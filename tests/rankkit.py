"""A real rank process for the tests of hostile moments (non-finite numbers, big states,
racing commands): it runs ``control()`` on a model given as source code, and obeys
lines on its stdin so a test can play the program (``state.loss = float("nan")``).

Every wait has a deadline; a failure shows the child's output.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from conftest import ROOT

__all__ = ["ProgramRank", "runctl_cli"]

_PROGRAM = """
import json, os, sys, threading, time
{models}

state = {state}
from runctl.agent import control
ctl = control(state, run=os.environ["RUN"], rank=os.environ.get("RANK_", "0"),
              url=os.environ["URL"], heartbeat=float(os.environ.get("HB", "1")))
ctl.wait_ready(30)

def say(**kv):
    os.write(1, ("@@" + json.dumps(kv) + "\\n").encode())  # one write: the agent logs too

say(ready=os.getpid())
for line in sys.stdin:  # the test plays the program: one statement per line
    try:
        with ctl.lock:
            exec(line, {{"state": state, "ctl": ctl, "math": __import__("math")}})
        say(done=line.strip())
    except Exception as exc:
        say(done=line.strip(), error=repr(exc))
ctl.close()
"""


class ProgramRank:
    """``with ProgramRank(models, "Cfg()", run=..., url=...) as rank: rank.do("...")``."""

    def __init__(
        self,
        models: str,
        state: str,
        *,
        run: str,
        url: str,
        rank: str = "0",
        heartbeat: float = 1.0,
        env: dict[str, str] | None = None,
    ) -> None:
        code = _PROGRAM.format(models=textwrap.dedent(models), state=state)
        full_env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT),
            "RUN": run,
            "RANK_": rank,
            "URL": url,
            "HB": str(heartbeat),
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=full_env,
            cwd=str(ROOT),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.said: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                if "@@{" in line:  # the agent's log may share the line
                    self.said.append(json.loads(line[line.index("@@{") + 2 :]))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_said(self, key: str, timeout: float = 40.0) -> dict[str, Any]:
        """The next line the program said with ``key`` (deadline; fails with its output)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, said in enumerate(self.said):
                    if key in said:
                        del self.said[i]
                        return said
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"rank never said {key!r} (exit {self.proc.poll()}):\n{self.output}"
                    )
                self._cond.wait(min(left, 0.2))

    def start(self) -> Self:
        self.wait_said("ready")
        return self

    def do(self, statement: str) -> None:
        """Run one statement in the program, under ``ctl.lock``, and wait until it ran."""
        assert self.proc.stdin is not None and "\n" not in statement
        self.proc.stdin.write(statement + "\n")
        self.proc.stdin.flush()
        said = self.wait_said("done")
        assert said["done"] == statement and "error" not in said, (said, self.output)

    def close(self, timeout: float = 20.0) -> str:
        """End the program (stdin closed: it calls ``ctl.close()``); its output."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdout.close()
        with contextlib.suppress(OSError):  # a killed program never read its stdin to the end
            self.proc.stdin.close()
        return self.output

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def runctl_cli(
    *args: str, url: str, cwd: Path | None = None, timeout: float = 40.0
) -> subprocess.CompletedProcess[str]:
    """``runctl ARGS`` as a user types it (a subprocess, deadline)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUNCTL_NATS_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "runctl", *args],
        env=env,
        cwd=str(cwd or ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
