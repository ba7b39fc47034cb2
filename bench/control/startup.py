"""runctl only: what ``control()`` costs a program at start. One fresh process per sample.

    python -m bench.control.startup --url nats://127.0.0.1:P      # an existing server
    python -m bench.control.startup --embedded --port P --data-dir D

Prints one JSON line: import time of ``agent``, time for ``control()`` to return, time until
the agent is connected and registered (``wait_ready``), and RSS before/after. The baseline
RSS is taken once the program's own state exists (pydantic imported), so the difference is
what runctl adds: its imports, the agent thread, the connection, buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.control.program import State, rss_kb

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None)
    parser.add_argument("--embedded", action="store_true")
    parser.add_argument("--port", type=int, default=0, help="embedded server's port")
    parser.add_argument("--data-dir", default=".runctl")
    parser.add_argument("--run", default="bench-start")
    parser.add_argument(
        "--settle",
        type=float,
        default=1.2,
        help="seconds to run (heartbeats) before the last RSS sample",
    )
    args = parser.parse_args(argv)

    state = State()
    rss_base = rss_kb()
    t0 = time.perf_counter()
    from runctl.agent import control

    t1 = time.perf_counter()
    rss_import = rss_kb()
    if args.embedded:
        # the agent's zero-setup server listens on 4222; other processes on this machine
        # (tests, other benchmarks) may own that port, so the benchmark moves it. Without
        # the gateway: this measures what control() costs until the bus answers.
        os.environ["RUNCTL_NATS_PORT"] = str(args.port)
        ctl = control(state, run=args.run, embedded=True, data_dir=args.data_dir, gateway=False)
    else:
        ctl = control(state, run=args.run, url=args.url)
    t2 = time.perf_counter()
    ctl.wait_ready(20)
    t3 = time.perf_counter()
    rss_ready = rss_kb()
    time.sleep(args.settle)
    rss_settled = rss_kb()
    t4 = time.perf_counter()
    ctl.close()
    t5 = time.perf_counter()
    print(
        json.dumps(
            {
                "import_s": t1 - t0,
                "control_s": t2 - t1,
                "ready_s": t3 - t1,
                "close_s": t5 - t4,
                "rss_base_kb": rss_base,
                "rss_import_kb": rss_import,
                "rss_ready_kb": rss_ready,
                "rss_settled_kb": rss_settled,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
