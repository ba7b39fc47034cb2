"""The controlled program: one state model and one main loop, for both tools.

    python -m bench.control.program --tool freak  --shm PAGE --ready FILE --port P
    python -m bench.control.program --tool runctl --shm PAGE --ready FILE --nats URL --run R

Runs under Freak's venv (pydantic 1.10) or runctl's (pydantic 2): the model below is
written to mean the same in both. The loop's work mode is read from the shared page every
iteration (``pause``, ``sleep``, ``release``, ``hold``, ``exit``), so one process serves
every mode and the tools can be measured in alternation.

- sleep:   ``time.sleep(2 ms)`` (a bot, a poller: mostly waiting)
- release: sha256 of a 1 MiB buffer, ~0.7 ms with the GIL released (I/O, numpy, torch)
- hold:    ~0.4 ms of pure-Python arithmetic, holding the GIL (a Python-heavy loop)
- threads: two threads of the program's own run the ``hold`` work back to back (a program
  with a second compute thread, or data-loader threads); the main loop sleeps 2 ms and
  reports their iterations: what a program with several busy threads gets done

After each iteration the loop reads ``state.marker`` (a plain attribute read, as a user's
program would) and records when it first sees a new value.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from bench.control.shm import AGENT_AS_STARTED, AGENT_ON, MODES, Page

__all__ = ["HOLD_N", "Optimizer", "State", "main", "rss_kb", "write_ready"]

#: pure-Python iterations of one "hold" step (~0.4 ms on the reference machine)
HOLD_N = 8000
RELEASE_BYTES = 1 << 20
SLEEP_S = 0.002
PAUSE_S = 0.01


class Optimizer(BaseModel):
    lr: float = 0.001
    momentum: float = 0.9
    schedule: Literal["constant", "cosine", "step"] = "cosine"


class State(BaseModel):
    marker: int = 0
    lr: float = 0.001
    batch_size: int = 32
    name: str = "bench"
    phase: Literal["train", "eval"] = "train"
    note: Optional[str] = None  # noqa: UP045 - pydantic 1.10 on the Freak side
    paused: bool = False
    optimizer: Optimizer = Field(default_factory=Optimizer)


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def hold(n: int = HOLD_N) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def start_freak(state: State, args: argparse.Namespace) -> Callable[[], None]:
    from freak import control  # type: ignore[import-not-found, unused-ignore]

    freak = control(state, host="127.0.0.1", port=args.port)
    stop: Callable[[], None] = freak.stop
    return stop


def start_runctl(state: State, args: argparse.Namespace) -> Callable[[], None]:
    from runctl.agent import control

    ctl = control(state, run=args.run, rank=args.rank, url=args.nats)
    ctl.wait_ready(20)
    return ctl.close


class Workers:
    """Two busy threads of the program's own, working only while ``running`` is set
    (``threads`` mode); started on first use, blocked (no wake-ups) otherwise."""

    def __init__(self, n: int = 2) -> None:
        self.n = n
        self.counts = [0] * n
        self.running = threading.Event()
        self.threads: list[threading.Thread] = []

    def run(self, on: bool) -> None:
        if on and not self.threads:
            self.threads = [
                threading.Thread(target=self.work, args=(i,), daemon=True) for i in range(self.n)
            ]
            for t in self.threads:
                t.start()
        if on != self.running.is_set():
            (self.running.set if on else self.running.clear)()

    def work(self, i: int) -> None:
        counts, running = self.counts, self.running
        while running.wait():
            hold()
            counts[i] += 1

    @property
    def total(self) -> int:
        return sum(self.counts)


class Tool:
    """The tool in this process, started as the program starts; runctl's agent can be
    closed and started again between measurements (``Page.want_agent``), so the program
    with runctl can be compared with itself without it: two processes of one program differ
    by several percent in speed, in either direction."""

    def __init__(self, state: State, args: argparse.Namespace) -> None:
        self.state, self.args = state, args
        self.stop: Callable[[], None] = lambda: None
        if args.tool == "freak":
            self.stop = start_freak(state, args)
        elif args.tool == "runctl":
            self.stop = start_runctl(state, args)
        self.on = args.tool == "runctl"

    def follow(self, page: Page) -> None:
        """Close or start runctl's agent as the page asks (called while paused)."""
        wanted = page.agent_wanted()
        if wanted == AGENT_AS_STARTED or self.args.tool != "runctl":
            return
        if (wanted == AGENT_ON) != self.on:
            if self.on:
                self.stop()
                self.stop = lambda: None
            else:
                self.stop = start_runctl(self.state, self.args)
            self.on = wanted == AGENT_ON
        if page.agent() != wanted:
            page.agent_is(wanted)

    def close(self) -> None:
        self.stop()


def loop(state: State, page: Page, tool: Tool | None = None) -> int:
    pause, sleep, release, hold_mode, threads = (
        MODES.index(m) for m in ("pause", "sleep", "release", "hold", "threads")
    )
    workers = Workers()
    buf = bytes(RELEASE_BYTES)
    sha256 = hashlib.sha256
    monotonic = time.monotonic
    n = 0
    last = state.marker
    while True:
        mode = page.mode()
        workers.run(mode == threads)
        if mode == sleep:
            time.sleep(SLEEP_S)
        elif mode == release:
            sha256(buf).digest()
        elif mode == hold_mode:
            hold()
        elif mode == pause:
            time.sleep(PAUSE_S)
            if tool is not None:
                tool.follow(page)
        elif mode == threads:
            time.sleep(SLEEP_S)
        else:
            workers.run(False)
            return n
        n += 1
        now = monotonic()
        marker = state.marker
        if marker != last:
            last = marker
            page.saw(marker, now)
        page.tick(workers.total if mode == threads else n, now)


def write_ready(path: str, ready: dict[str, Any]) -> None:
    """Write the READY JSON atomically: the runner never reads half a file."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(ready))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", choices=("freak", "runctl", "none"), required=True)
    parser.add_argument("--shm", required=True, help="shared page (bench.control.shm)")
    parser.add_argument("--ready", required=True, help="file to write the READY JSON to")
    parser.add_argument("--port", type=int, default=0, help="Freak's HTTP port")
    parser.add_argument("--nats", default=None, help="runctl: NATS URL")
    parser.add_argument("--run", default="bench", help="runctl: run id")
    parser.add_argument("--rank", default="0", help="runctl: rank")
    args = parser.parse_args(argv)

    import pydantic

    state = State()
    page = Page(args.shm)
    rss_before = rss_kb()
    started = time.perf_counter()
    tool = Tool(state, args)
    ready = {
        "tool": args.tool,
        "pid": os.getpid(),
        "start_s": time.perf_counter() - started,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_kb(),
        "python": sys.version.split()[0],
        "pydantic": pydantic.VERSION,
    }
    write_ready(args.ready, ready)
    try:
        loop(state, page, tool)
    finally:
        tool.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
