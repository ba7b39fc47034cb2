"""A tiny shared-memory page between the controlled program and the load client.

The program's main loop writes its iteration count and the last value of ``state.marker``
it saw, each with a CLOCK_MONOTONIC timestamp (system-wide on Linux, so comparable across
processes); the client reads them and sets the loop's work mode. No thread, socket or lock
is added to the controlled program for measuring it.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Final

__all__ = ["AGENT_AS_STARTED", "AGENT_OFF", "AGENT_ON", "MODES", "Page", "create"]

#: main-loop modes; "pause" parks the loop between measurements, "exit" ends the program
MODES: Final = ("pause", "sleep", "release", "hold", "exit", "threads")
SIZE: Final = 64
_MODE = struct.Struct("<q")  # offset 0: the mode the loop should run (index in MODES)
_LOOP = struct.Struct("<qd")  # offset 8: iterations, monotonic time at the last one
_SEEN = struct.Struct("<qd")  # offset 24: last marker value the loop saw, when it saw it
_AGENT = struct.Struct("<q")  # offset 40: the agent wanted; offset 48: the agent there
#: runctl's agent: as the program started it (0), running (1), closed (2)
AGENT_AS_STARTED: Final = 0
AGENT_ON: Final = 1
AGENT_OFF: Final = 2


class Page:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with self.path.open("r+b") as fh:
            self._mm = mmap.mmap(fh.fileno(), SIZE)

    # --- the program's side ---------------------------------------------------------------

    def mode(self) -> int:
        value: int = _MODE.unpack_from(self._mm, 0)[0]
        return value

    def tick(self, iterations: int, now: float) -> None:
        _LOOP.pack_into(self._mm, 8, iterations, now)

    def saw(self, marker: int, now: float) -> None:
        _SEEN.pack_into(self._mm, 24, marker, now)

    def agent_wanted(self) -> int:
        value: int = _AGENT.unpack_from(self._mm, 40)[0]
        return value

    def agent_is(self, value: int) -> None:
        _AGENT.pack_into(self._mm, 48, value)

    # --- the client's side ----------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        _MODE.pack_into(self._mm, 0, MODES.index(mode))

    def want_agent(self, value: int) -> None:
        _AGENT.pack_into(self._mm, 40, value)

    def agent(self) -> int:
        """The agent there now, as the program last reported it."""
        value: int = _AGENT.unpack_from(self._mm, 48)[0]
        return value

    def loop(self) -> tuple[int, float]:
        """(iterations, time of the last one); re-read until two reads agree (no torn read)."""
        return _stable(lambda: _LOOP.unpack_from(self._mm, 8))

    def seen(self) -> tuple[int, float]:
        return _stable(lambda: _SEEN.unpack_from(self._mm, 24))

    def close(self) -> None:
        self._mm.close()


def create(path: str | os.PathLike[str], mode: str = "pause") -> Page:
    Path(path).write_bytes(bytes(SIZE))
    page = Page(path)
    page.set_mode(mode)
    return page


def _stable(read: object) -> tuple[int, float]:
    assert callable(read)
    first = read()
    while True:
        again = read()
        if again == first:
            return int(first[0]), float(first[1])
        first = again
