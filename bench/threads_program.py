"""The program of ``bench_threads``: two busy threads of its own and one responder.

    python -m bench.threads_program --responder runctl --nats URL --run R --shm PAGE --ready FILE

Two threads run pure-Python arithmetic back to back (holding the GIL, as a second compute
thread or data-loader threads do) and the main loop sleeps 2 ms between reports of their
iterations on the shared page (``bench.control.shm``). The one responder in the process:

- ``runctl``: ``control(state)``, runctl's agent, answering sets;
- ``floor``: a bare nats-py subscriber on its own asyncio loop thread, which sets the field
  and answers: the least any Python thread that answers requests in this program can do;
- ``none``: nothing (the harness's own check).

When ready it writes the native thread ids of its busy threads and of the responder's
threads to ``--ready`` (JSON), so the harness can read their CPU times from ``/proc``.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from typing import Any

from pydantic import BaseModel

from bench.control.program import hold, write_ready
from bench.control.shm import MODES, Page

__all__ = ["FLOOR_SUBJECT", "State", "main"]

#: the floor responder's subject (``floor.<run>``)
FLOOR_SUBJECT = "floor.{run}"


class State(BaseModel):
    marker: int = 0
    lr: float = 0.001


def start_floor(state: State, url: str, run: str) -> None:
    """A bare nats-py responder on its own thread: set the field, answer."""
    import nats

    ready = threading.Event()

    async def serve() -> None:
        nc = await nats.connect(url)

        async def on_request(msg: Any) -> None:
            state.marker = int(msg.data)
            await msg.respond(b'{"ok":true}')

        await nc.subscribe(FLOOR_SUBJECT.format(run=run), cb=on_request)
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True, name="floor").start()
    if not ready.wait(20):
        raise SystemExit("the floor responder did not connect in 20 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--responder", choices=("runctl", "floor", "none"), required=True)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--shm", required=True)
    parser.add_argument("--ready", required=True)
    args = parser.parse_args(argv)

    state = State()
    page = Page(args.shm)
    close = None
    if args.responder == "runctl":
        from runctl import control

        ctl = control(state, run=args.run, rank="0", url=args.nats).wait_ready(20)
        close = ctl.close
    elif args.responder == "floor":
        start_floor(state, args.nats, args.run)
    counts = [0, 0]

    def work(i: int) -> None:
        while True:
            hold()
            counts[i] += 1

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(2)]
    for t in workers:
        t.start()
    responder = [
        t.native_id
        for t in threading.enumerate()
        if t.name.startswith(("runctl", "floor")) and t.native_id is not None
    ]
    ready = {"workers": [t.native_id for t in workers], "responder": responder}
    write_ready(args.ready, ready)
    try:
        done = MODES.index("exit")
        while page.mode() != done:
            time.sleep(0.002)
            page.tick(counts[0] + counts[1], time.monotonic())
    finally:
        if close is not None:
            close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
