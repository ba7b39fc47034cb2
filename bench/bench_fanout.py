"""Fan-out: a broadcast get and stop to 1, 8, 32, 64 ranks, until every rank acknowledged.

    python -m bench.bench_fanout                    # default: one process per rank
    python -m bench.bench_fanout --quick            # tiny sizes: checks the harness
    python -m bench.bench_fanout --layout packed    # ranks share 4 processes
    python -m bench fanout                          # via the bench runner

Each rank is a real agent. ``--layout process`` (default) runs every rank in its own Python
process, a sync program whose main thread steps (``ctl.sync``) and sleeps, as a training
waiting on its accelerator would; ``--layout packed`` hosts the ranks as async agents on a
few processes (less memory and scheduling noise; same protocol), the agents of a process
sharing one NATS connection (``--connections own``: one each).
Every size runs once per agent event loop in ``--loops`` (default: the standard asyncio
loop, then uvloop via ``RUNCTL_LOOP=uvloop``), back to back, so the two compare under the
same machine load.

What one sample measures, from the client's side (``bus.Client`` in this process):

- ``get``: ``client.get(run, "all", fresh=True)`` -- the registry read that tells the
  client which ranks are alive, the request on ``runctl.<run>.all.cmd.get``, and the wait
  until every one of them replied with its state;
- ``stop``: ``client.stop(run, "all")`` -- the run-wide stop record written to the KV, the
  broadcast, and the wait for every rank's acknowledgement (the ranks keep running, so
  the stop can be repeated);
- ``registry``: the registry read alone (``Registry.records(run)``), to show its share.

A sample counts only if every rank acknowledged; the table shows how many did not.

The floor, in the same run (``--floor N``; by default 64 processes when the run measures
64 rank processes): N processes that are not runctl at all, each a thread answering a
broadcast with nats-py's own subscription and ``respond`` while the main thread sleeps
between steps as the ranks' loop does. A plain nats-py client times one broadcast until
all N answered. It is what waking N Python processes for one message costs on this
machine, and the 64-process stop is also shown as a multiple of it: on a machine where
the floor is near the target, the target says more about the machine than about runctl.

Prints a table and writes ``bench/results/fanout-<time>.json`` with machine facts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import anyio
import nats

from bench._machine import cpu_model, nats_server_version, package_version
from runctl.bus import Client, Gathered
from runctl.bus.server import NatsServer

__all__ = ["main"]

ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = Path(__file__).resolve().parent / "results"
TARGET_MS: Final = 20.0  # 64 rank processes, stop, every one acknowledged, p50
TARGET_RANKS: Final = 64
#: packed layout: a stop to this many ranks, p50, every one acknowledged
PACKED_TARGET_MS: Final = 100.0
PACKED_TARGET_RANKS: Final = 1000
#: flat cost per rank: the stop's p50 per rank at the largest size at most this many times
#: its p50 per rank at the next size measured (no step growing faster than the ranks)
FLAT_GROWTH: Final = 1.25

RANK_PROGRAM: Final = textwrap.dedent("""
    import time
    from pydantic import BaseModel
    from runctl.agent import control

    class State(BaseModel):
        lr: float = 0.001
        quit: bool = False

    state = State()
    ctl = control(state)  # run, rank and url from the environment
    step = 0
    while not state.quit:
        ctl.sync(step)
        step += 1
        time.sleep(STEP_INTERVAL)
    ctl.close()
""")

PACKED_PROGRAM: Final = textwrap.dedent("""
    import os, sys, anyio
    from contextlib import AsyncExitStack
    from pydantic import BaseModel
    from runctl.agent import Agent
    from runctl.bus.connection import close_quietly, connect, env_url

    class State(BaseModel):
        lr: float = 0.001
        quit: bool = False

    async def main():
        first, count, shared = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "shared"
        nc = await connect(env_url(), name="bench-packed", role="agent") if shared else None
        async with AsyncExitStack() as stack:
            if nc is not None:
                stack.push_async_callback(close_quietly, nc)
            agents = [await stack.enter_async_context(Agent(State(), rank=first + i,
                                                             connection=nc))
                      for i in range(count)]
            step = 0
            while not any(a.state.quit for a in agents):
                for a in agents:
                    a.sync(step)
                step += 1
                await anyio.sleep(STEP_INTERVAL)

    anyio.run(main)
""")


FLOOR_PROGRAM: Final = textwrap.dedent("""
    import asyncio, sys, threading, time
    import nats

    async def answer(url, subject):
        nc = await nats.connect(url)

        async def reply(msg):
            await msg.respond(b'{"ok":true}')

        await nc.subscribe(subject, cb=reply)
        await nc.flush()
        await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(answer(sys.argv[1], sys.argv[2]),),
                     daemon=True).start()
    while True:
        time.sleep(STEP_INTERVAL)
""")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_fanout", description="broadcast get/stop latency to N ranks"
    )
    p.add_argument("--sizes", default="1,8,32,64", help="comma-separated rank counts")
    p.add_argument("--iterations", type=int, default=200, help="samples per verb and size")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--layout", choices=("process", "packed"), default="process")
    p.add_argument("--procs", type=int, default=4, help="processes for --layout packed")
    p.add_argument(
        "--connections",
        choices=("shared", "own"),
        default="shared",
        help="--layout packed: the agents of a process share one NATS connection (Agent's "
        "connection=; needs a login that may publish to reply inboxes, as on this "
        "benchmark's server without logins), or each opens its own",
    )
    p.add_argument(
        "--step-interval",
        type=float,
        default=0.01,
        metavar="SECONDS",
        help="each rank's loop: ctl.sync(step), then sleep this long",
    )
    p.add_argument(
        "--loops",
        default="asyncio,uvloop",
        help="the ranks' agent event loops to compare (RUNCTL_LOOP), comma-separated",
    )
    p.add_argument(
        "--floor",
        type=int,
        default=None,
        metavar="N",
        help="also time a broadcast to N bare nats-py responder processes, the floor of this "
        f"machine (default: {TARGET_RANKS} when the run measures {TARGET_RANKS} rank processes; "
        "0: none)",
    )
    p.add_argument("--url", default=None, help="use this nats-server instead of starting one")
    p.add_argument("--quick", action="store_true", help="sizes 1,4 and 20 samples")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.iterations, args.warmup = "1,4", 20, 3
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    args.loops = [s.strip() for s in str(args.loops).split(",") if s.strip()]
    if args.floor is None:
        args.floor = TARGET_RANKS if args.layout == "process" and TARGET_RANKS in args.sizes else 0
    if bad := set(args.loops) - {"asyncio", "uvloop"}:
        p.error(f"--loops: unknown loop(s) {', '.join(sorted(bad))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    facts = machine()
    server: NatsServer | None = None
    with tempfile.TemporaryDirectory(prefix="runctl-fanout-") as tmp:
        url = args.url
        if url is None:
            server = NatsServer(store_dir=Path(tmp) / "nats").start()
            url = server.url
        try:
            process = server.process if server is not None else None
            server_pid = process.pid if process is not None else None
            results = anyio.run(_run_all, args, url, server_pid)
            floor = None
            if args.floor > 0:
                try:
                    floor = anyio.run(_run_floor, args, url, server_pid)
                except Exception as exc:  # the runctl figures stand without it: say so, keep them
                    print(f"  floor not measured: {type(exc).__name__}: {exc}", flush=True)
        finally:
            if server is not None:
                server.stop()
    facts["loadavg_after"] = os.getloadavg()
    report = {
        "benchmark": "fanout",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": facts,
        "target": {"ranks": TARGET_RANKS, "p50_ms": TARGET_MS},
        "results": results,
        "floor": floor,
    }
    report["targets"] = targets(report)
    print(render(report))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fanout-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


async def _run_all(
    args: argparse.Namespace, url: str, server_pid: int | None
) -> list[dict[str, Any]]:
    results = []
    for n in args.sizes:
        for loop in args.loops:  # side by side: each size with every loop, back to back
            results.append(await _run_one(args, url, server_pid, n, loop))
    return results


async def _run_one(
    args: argparse.Namespace, url: str, server_pid: int | None, n: int, loop: str
) -> dict[str, Any]:
    run = f"fanout-{n}-{loop}-{os.getpid()}"
    procs = start_ranks(args, url, run, n, loop)
    done = False
    try:
        async with await Client.connect(url, timeout=5.0) as client:
            await wait_alive(client, run, n, timeout=30 + n)
            await anyio.sleep(min(5.0, 1.0 + n / 16))  # the last starters settle
            cpu = CpuMeter([p.pid for p in procs], server_pid)
            row = await measure(client, run, n, args.iterations, args.warmup, cpu)
            await client.set(run, "all", "quit", True)
        done = True
        row["layout"] = args.layout
        row["loop"] = loop
        print(
            f"  {n:>3} ranks ({loop}): get p50 {row['get']['p50_ms']:.2f} ms, "
            f"stop p50 {row['stop']['p50_ms']:.2f} ms",
            flush=True,
        )
    finally:
        stop_ranks(procs, kill=not done)
    return row


async def _run_floor(args: argparse.Namespace, url: str, server_pid: int | None) -> dict[str, Any]:
    """The floor of this machine: a broadcast to ``args.floor`` bare nats-py responders."""
    n = args.floor
    subject = f"bench.floor.{os.getpid()}"
    procs = start_floor(args, url, subject)
    nc = await nats.connect(url)
    try:

        async def broadcast(deadline: float = 5.0) -> int:
            answered = 0
            complete = anyio.Event()

            async def on_reply(_msg: Any) -> None:
                nonlocal answered
                answered += 1
                if answered == n:
                    complete.set()

            sub = await nc.subscribe(nc.new_inbox(), cb=on_reply)
            try:
                await nc.publish(subject, b"{}", reply=sub.subject)
                with anyio.move_on_after(deadline):
                    await complete.wait()
            finally:
                await sub.unsubscribe()
            return answered

        with anyio.fail_after(30 + n):
            while True:  # until every responder has subscribed
                if await broadcast(1.0) == n:
                    break
                if exited := [p.returncode for p in procs if p.poll() is not None]:
                    raise RuntimeError(f"{len(exited)} floor processes exited ({exited[0]})")
                await anyio.sleep(0.2)
        await anyio.sleep(min(5.0, 1.0 + n / 16))
        cpu = CpuMeter([p.pid for p in procs], server_pid)
        await cpu.measure_idle()
        row = await sample(broadcast, n, args.iterations, args.warmup, cpu)
        row["processes"] = n
        print(f"  floor, {n} bare nats-py processes: p50 {row['p50_ms']:.2f} ms", flush=True)
        return row
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()
        stop_ranks(procs, kill=True)


def _stepping(args: argparse.Namespace, program: str) -> str:
    """``program`` with its loop's ``STEP_INTERVAL`` set from ``--step-interval``."""
    return f"STEP_INTERVAL = {float(args.step_interval)!r}\n" + program


def start_floor(args: argparse.Namespace, url: str, subject: str) -> list[subprocess.Popen[bytes]]:
    """Start ``args.floor`` bare responders to broadcasts on ``subject`` (no runctl)."""
    program = _stepping(args, FLOOR_PROGRAM)
    return [
        subprocess.Popen(
            [sys.executable, "-c", program, url, subject],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(args.floor)
    ]


class CpuMeter:
    """CPU seconds used by the ranks, the server and this process (from /proc), minus
    what they use idle: what one broadcast costs the machine."""

    def __init__(self, rank_pids: list[int], server_pid: int | None) -> None:
        self.rank_pids = rank_pids
        self.server_pid = server_pid
        self.idle = (0.0, 0.0, 0.0)

    def snapshot(self) -> tuple[float, float, float, float]:
        server = _cpu_seconds(self.server_pid) if self.server_pid else 0.0
        ranks = sum(_cpu_seconds(pid) for pid in self.rank_pids)
        client = sum(os.times()[:2])
        return ranks, server, client, time.perf_counter()

    async def measure_idle(self, seconds: float = 2.0) -> None:
        before = self.snapshot()
        await anyio.sleep(seconds)
        after = self.snapshot()
        wall = after[3] - before[3]
        self.idle = tuple((after[i] - before[i]) / wall for i in range(3))  # type: ignore[assignment]

    def per_call(
        self, before: tuple[float, ...], after: tuple[float, ...], calls: int
    ) -> dict[str, float]:
        wall = after[3] - before[3]
        used = [
            max(0.0, (after[i] - before[i]) - self.idle[i] * wall) / calls * 1e3 for i in range(3)
        ]
        return {"ranks_ms": used[0], "server_ms": used[1], "client_ms": used[2]}


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_ranks(
    args: argparse.Namespace, url: str, run: str, n: int, loop: str = "asyncio"
) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "RUNCTL_RUN": run,
        "RUNCTL_NATS_URL": url,
        "PYTHONPATH": str(ROOT),
        "RUNCTL_WORLD_SIZE": str(n),
        "RUNCTL_LOOP": loop,
    }
    procs = []
    if args.layout == "process":
        for rank in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _stepping(args, RANK_PROGRAM)],
                    env={**env, "RUNCTL_RANK": str(rank)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=ROOT,
                )
            )
    else:
        workers = max(1, min(args.procs, n))
        per, extra = divmod(n, workers)
        first = 0
        for w in range(workers):
            count = per + (1 if w < extra else 0)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        _stepping(args, PACKED_PROGRAM),
                        str(first),
                        str(count),
                        args.connections,
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=ROOT,
                )
            )
            first += count
    return procs


def stop_ranks(procs: list[subprocess.Popen[bytes]], *, kill: bool = False) -> None:
    deadline = time.monotonic() + (0 if kill else 15)
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def wait_alive(client: Client, run: str, n: int, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                infos = await client.ranks(run)
            except Exception:
                infos = []
            if sum(i.liveness == "alive" for i in infos) == n:
                return
            await anyio.sleep(0.2)


async def measure(
    client: Client, run: str, n: int, iterations: int, warmup: int, cpu: CpuMeter
) -> dict[str, Any]:
    registry = await client.registry()
    await cpu.measure_idle()

    async def get() -> int:
        res = await client.get(run, "all", fresh=True)
        return _acked(res)

    async def stop() -> int:
        return _acked(await client.stop(run, "all", reason="bench"))

    async def read_registry() -> int:
        return len(await registry.records(run))

    row: dict[str, Any] = {
        "ranks": n,
        "idle_cpu": dict(zip(("ranks", "server", "client"), cpu.idle, strict=True)),
    }
    for name, call in (("get", get), ("stop", stop), ("registry", read_registry)):
        row[name] = await sample(call, n, iterations, warmup, cpu)
    return row


async def sample(
    call: Callable[[], Awaitable[int]], n: int, iterations: int, warmup: int, cpu: CpuMeter
) -> dict[str, Any]:
    times: list[float] = []
    incomplete = 0
    for _ in range(warmup):
        await call()
    before = cpu.snapshot()
    for _ in range(iterations):
        t0 = time.perf_counter()
        acked = await call()
        dt = time.perf_counter() - t0
        if acked != n:
            incomplete += 1
            continue
        times.append(dt * 1e3)
    return {
        "p50_ms": statistics.median(times) if times else float("nan"),
        "p99_ms": percentile(times, 99),
        "mean_ms": statistics.fmean(times) if times else float("nan"),
        "min_ms": min(times, default=float("nan")),
        "max_ms": max(times, default=float("nan")),
        "samples": len(times),
        "incomplete": incomplete,
        #: CPU time one call cost each party, beyond what it uses idle
        "cpu_per_call": cpu.per_call(before, cpu.snapshot(), iterations),
    }


def _acked(res: object) -> int:
    assert isinstance(res, Gathered)
    return len(res.results) if not res.missing else -1


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "loadavg": os.getloadavg(),
        "nats_server": nats_server_version(),
        "nats_py": package_version("nats-py"),
        "msgspec": package_version("msgspec"),
    }


def _cpu(figure: dict[str, Any]) -> str:
    c = figure["cpu_per_call"]
    return f"{c['ranks_ms']:.1f} + {c['server_ms']:.1f} + {c['client_ms']:.1f} ms"


def render(report: dict[str, Any]) -> str:
    params = report["parameters"]
    lines = [
        f"fan-out: broadcast until every rank acknowledged ({params['layout']} "
        f"layout, ranks step every {params['step_interval'] * 1e3:g} ms, "
        f"{report['machine']['cpus']} cpus, load {report['machine']['loadavg'][0]:.2f} before, "
        f"{report['machine']['loadavg_after'][0]:.2f} after)",
        "",
        "| ranks | agent loop | get p50 | get p99 | stop p50 | stop p99 | registry read p50 "
        "| incomplete | CPU per get / stop: ranks + server + client |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["results"]:
        g, s, r = row["get"], row["stop"], row["registry"]
        lines.append(
            f"| {row['ranks']} | {row.get('loop', 'asyncio')} | {g['p50_ms']:.2f} ms | "
            f"{g['p99_ms']:.2f} ms | {s['p50_ms']:.2f} ms | {s['p99_ms']:.2f} ms | "
            f"{r['p50_ms']:.2f} ms | {g['incomplete'] + s['incomplete']} | "
            f"{_cpu(g)} / {_cpu(s)} |"
        )
    floor = report.get("floor")
    if floor:
        lines += [
            "",
            f"floor, same run: {floor['processes']} bare nats-py processes (a thread answers "
            "with nats-py's subscribe and respond, the main thread sleeps as the ranks' loop): "
            f"broadcast until all answered p50 {floor['p50_ms']:.2f} ms, p99 "
            f"{floor['p99_ms']:.2f} ms, CPU per broadcast {_cpu(floor)}",
        ]
    lines.append("")
    lines.extend(
        f"target: {t['name']}: {'met' if t['met'] else 'MISSED'} ({t['measured']})"
        for t in targets(report)
    )
    return "\n".join(lines)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets this run can judge: 64 rank processes (stop p50), 1,000 packed ranks
    (stop p50), and a flat cost per rank between the two largest sizes of a loop."""
    layout = report["parameters"]["layout"]
    floor = report.get("floor") or {}
    out: list[dict[str, Any]] = []
    by_loop: dict[str, list[dict[str, Any]]] = {}
    for row in report["results"]:
        loop = row.get("loop", "asyncio")
        by_loop.setdefault(loop, []).append(row)
        stop = row["stop"]["p50_ms"]
        if layout == "process" and row["ranks"] == TARGET_RANKS:
            name = f"{TARGET_RANKS} rank processes, stop p50 <= {TARGET_MS:g} ms, {loop} loop"
            measured = f"{stop:.2f} ms"
            if floor.get("processes") == TARGET_RANKS and floor.get("p50_ms"):
                measured += (
                    f"; {stop / floor['p50_ms']:.2f}x the floor of this run, "
                    f"{floor['p50_ms']:.2f} ms"
                )
            out.append({"name": name, "met": stop <= TARGET_MS, "measured": measured})
        if layout == "packed" and row["ranks"] == PACKED_TARGET_RANKS:
            name = (
                f"{PACKED_TARGET_RANKS} packed ranks, stop p50 <= {PACKED_TARGET_MS:g} ms, "
                f"{loop} loop"
            )
            out.append(
                {"name": name, "met": stop <= PACKED_TARGET_MS, "measured": f"{stop:.2f} ms"}
            )
    for loop, rows in by_loop.items():
        rows = sorted(rows, key=lambda r: r["ranks"])
        if len(rows) < 2 or rows[-1]["ranks"] < 2 * TARGET_RANKS:
            continue
        small, big = rows[-2], rows[-1]
        per_small = small["stop"]["p50_ms"] / small["ranks"]
        per_big = big["stop"]["p50_ms"] / big["ranks"]
        growth = per_big / per_small if per_small else float("nan")
        name = (
            f"flat cost per rank, stop {small['ranks']} -> {big['ranks']} ranks, {loop} loop "
            f"(per-rank p50 grows <= {FLAT_GROWTH:g}x)"
        )
        measured = (
            f"{per_small * 1e3:.0f} -> {per_big * 1e3:.0f} us per rank, {growth:.2f}x; "
            f"{big['ranks'] / small['ranks']:.1f}x the ranks, "
            f"{big['stop']['p50_ms'] / small['stop']['p50_ms']:.2f}x the time"
        )
        out.append({"name": name, "met": growth <= FLAT_GROWTH, "measured": measured})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
