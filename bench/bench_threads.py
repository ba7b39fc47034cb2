"""What a set costs a program whose own threads hold the GIL, against the floor.

    python -m bench.bench_threads            # 2 rounds of 12 window pairs per responder
    python -m bench.bench_threads --quick    # a few short windows: checks the harness
    python -m bench threads                  # via the bench runner

The program (``bench.threads_program``) has two busy pure-Python threads and one responder:
runctl's agent, or the **floor**: a bare nats-py subscriber thread that sets the field and
answers, the least any Python thread answering requests inside the program can cost it.
Requests are paced at ``--rate`` per second (several in flight when answers are slower than
the pace), straight on NATS: runctl's ``Client.set`` (answer and the registry's and journal's
acknowledgements, as for every set) or a plain request to the floor.

Windows alternate, in one process per responder, between no requests and requests. For
each loaded window, against the mean of the quiet windows on either side:

- the busy threads' iterations (the target: >= 98 % under 100 sets/s);
- the busy threads' CPU time lost per request, from ``/proc/<pid>/task/<tid>/schedstat``:
  far steadier than iteration counts, which drift with this machine's speed;
- the responder's own CPU time per request.

At ``r`` requests per second the threads can keep 98 % only if a request costs them at most
``20 / r`` ms (0.2 ms at 100/s); the floor shows what a Python thread answering in the
process costs at least, on this machine. Writes ``bench/results/threads-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import nats

from bench._machine import machine
from bench.control import shm
from bench.control.procs import (
    REPO,
    BenchError,
    child_env,
    die_with_parent,
    read_ready,
    tail,
    wait_or_kill,
)
from bench.control.report import median_interval
from bench.threads_program import FLOOR_SUBJECT
from runctl.bus.client import Client
from runctl.bus.server import NatsServer

__all__ = ["TARGET_PCT", "main"]

RESULTS: Final = Path(__file__).resolve().parent / "results"
#: the busy threads keep this share of their iterations under the paced sets (%)
TARGET_PCT: Final = 98.0
RESPONDERS: Final = ("floor", "runctl")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_threads", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="a few short windows; numbers meaningless")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second")
    p.add_argument("--in-flight", type=int, default=8, help="requests in flight at most")
    p.add_argument("--window", type=float, default=1.0, help="seconds per window")
    p.add_argument("--pairs", type=int, default=12, help="loaded windows per responder, round")
    p.add_argument("--rounds", type=int, default=2, help="rounds (responders' order alternates)")
    p.add_argument("--warm", type=float, default=3.0, help="seconds before the first window")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.window, args.pairs, args.rounds, args.warm = 0.2, 2, 1, 0.3
    return args


def cpu_ns(pid: int, tids: list[int]) -> int:
    """CPU time the threads ``tids`` of ``pid`` spent so far (ns)."""
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


@dataclass
class Window:
    """One window: per second of it, the threads' iterations and CPU (ms), the
    responder's CPU (ms), and the requests answered."""

    iterations: float
    threads_ms: float
    responder_ms: float
    rate: float


@dataclass
class Figures:
    ratio: list[float] = field(default_factory=list)
    lost_ms: list[float] = field(default_factory=list)
    responder_ms: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    errors: int = 0


class Program:
    """The program process with one responder, and its shared page."""

    def __init__(self, responder: str, url: str, run: str, workdir: Path) -> None:
        self.responder, self.workdir = responder, workdir
        self.page_path, self.ready_path = workdir / "page", workdir / "ready.json"
        self.page = shm.create(self.page_path, "pause")
        self.log = workdir / "program.log"
        argv = [
            sys.executable, "-m", "bench.threads_program", "--responder", responder,
            "--nats", url, "--run", run, "--shm", str(self.page_path),
            "--ready", str(self.ready_path),
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self.ready: dict[str, list[int]] = {}

    def wait_ready(self, timeout: float = 60.0) -> None:
        what = f"{self.responder} program"
        self.ready = read_ready(self.proc, self.ready_path, self.log, what, timeout)

    def sample(self) -> tuple[int, int, int, float]:
        """(iterations, threads' CPU ns, responder's CPU ns, when)."""
        if self.proc.poll() is not None:
            raise BenchError(f"{self.responder} program exited:\n{tail(self.log)}")
        iterations, _ = self.page.loop()
        pid = self.proc.pid
        threads = cpu_ns(pid, self.ready["workers"])
        return iterations, threads, cpu_ns(pid, self.ready["responder"]), time.monotonic()

    def stop(self) -> None:
        self.page.set_mode("exit")
        wait_or_kill(self.proc, 10)
        self.page.close()


async def measure(
    program: Program, url: str, run: str, args: argparse.Namespace, figures: Figures
) -> None:
    """Alternate quiet and loaded windows; add each loaded one's figures."""
    nc = await nats.connect(url)
    client = await Client.connect(url)
    latencies: list[float] = []
    marker = 0

    async def one(value: int) -> None:
        started = time.perf_counter()
        try:
            if program.responder == "runctl":
                await client.set(run, 0, "marker", value)
            else:
                await nc.request(FLOOR_SUBJECT.format(run=run), str(value).encode(), timeout=5)
        except Exception:
            figures.errors += 1
            return
        latencies.append((time.perf_counter() - started) * 1e3)

    async def window(loaded: bool) -> Window:
        nonlocal marker
        answered = len(latencies)
        it0, th0, re0, t0 = program.sample()
        if loaded:
            in_flight = anyio.Semaphore(args.in_flight)

            async def paced(value: int) -> None:
                async with in_flight:
                    await one(value)

            async with anyio.create_task_group() as tg:
                due = t0
                while time.monotonic() - t0 < args.window:
                    marker += 1
                    tg.start_soon(paced, marker)
                    due += 1 / args.rate
                    await anyio.sleep(max(0.0, due - time.monotonic()))
        else:
            await anyio.sleep(args.window)
        it1, th1, re1, t1 = program.sample()
        elapsed = t1 - t0
        return Window(
            (it1 - it0) / elapsed,
            (th1 - th0) / 1e6 / elapsed,
            (re1 - re0) / 1e6 / elapsed,
            (len(latencies) - answered) / elapsed,
        )

    try:
        await anyio.sleep(args.warm)  # the agent's first heartbeats: it sees the busy threads
        before = await window(False)
        for _ in range(args.pairs):
            loaded = await window(True)
            after = await window(False)
            quiet = Window(
                (before.iterations + after.iterations) / 2,
                (before.threads_ms + after.threads_ms) / 2,
                (before.responder_ms + after.responder_ms) / 2,
                0.0,
            )
            if quiet.iterations and loaded.rate:
                figures.ratio.append(loaded.iterations / quiet.iterations)
                figures.lost_ms.append((quiet.threads_ms - loaded.threads_ms) / loaded.rate)
                figures.responder_ms.append(
                    (loaded.responder_ms - quiet.responder_ms) / loaded.rate
                )
                figures.rate.append(loaded.rate)
            before = after
        figures.latency_ms.extend(latencies)
    finally:
        await client.close()
        await nc.close()


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"median": None, "ci90": None, "n": 0}
    lo, hi = median_interval(values)
    return {"median": statistics.median(values), "ci90": [lo, hi], "n": len(values)}


def measure_rounds(args: argparse.Namespace, results: dict[str, Figures]) -> None:
    """Every round: each responder's program in turn (the order alternates), measured."""
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp, NatsServer() as server:
        for rnd in range(args.rounds):
            order = RESPONDERS if rnd % 2 == 0 else tuple(reversed(RESPONDERS))
            for name in order:
                workdir = Path(tmp) / f"{name}-{rnd}"
                workdir.mkdir()
                run = f"bench-threads-{os.getpid()}-{rnd}"
                program = Program(name, server.url, run, workdir)
                try:
                    program.wait_ready()
                    program.page.set_mode("sleep")
                    anyio.run(measure, program, server.url, run, args, results[name])
                finally:
                    program.stop()
            print(f"  round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    results = {name: Figures() for name in RESPONDERS}
    try:
        measure_rounds(args, results)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1

    figures: dict[str, dict[str, Any]] = {
        name: {
            "iterations_ratio": summary(f.ratio),
            "threads_cpu_lost_ms_per_request": summary(f.lost_ms),
            "responder_cpu_ms_per_request": summary(f.responder_ms),
            "requests_per_s": summary(f.rate),
            "latency_ms": summary(f.latency_ms),
            "errors": f.errors,
        }
        for name, f in results.items()
    }
    budget = (100 - TARGET_PCT) * 10 / args.rate  # ms of the threads' CPU per request
    print(
        f"\nTwo busy threads, {args.rate:g} requests/s paced, {args.rounds} rounds x "
        f"{args.pairs} windows of {args.window:g} s per responder (medians, 90 % CI):\n"
    )
    print(
        "| responder | requests/s | threads' iterations vs quiet | threads' CPU lost per "
        "request | responder's CPU per request | request p50 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    labels = {"floor": "floor: bare nats-py thread", "runctl": "runctl's agent (set)"}
    for name, fig in figures.items():
        ratio, lost = fig["iterations_ratio"], fig["threads_cpu_lost_ms_per_request"]
        resp, rate, lat = (
            fig["responder_cpu_ms_per_request"],
            fig["requests_per_s"],
            fig["latency_ms"],
        )
        if ratio["median"] is None:
            print(f"| {labels[name]} | no loaded window answered | | | | |")
            continue
        print(
            f"| {labels[name]} | {rate['median']:.0f} | {ratio['median'] * 100:.1f} % "
            f"[{ratio['ci90'][0] * 100:.1f}-{ratio['ci90'][1] * 100:.1f}] | "
            f"{lost['median']:.2f} ms [{lost['ci90'][0]:.2f}-{lost['ci90'][1]:.2f}] | "
            f"{resp['median']:.2f} ms | {lat['median']:.1f} ms |"
        )
    verdicts: dict[str, Any] = {}
    run_fig, floor_fig = figures["runctl"], figures["floor"]
    if run_fig["iterations_ratio"]["median"] is not None:
        lo, hi = (x * 100 for x in run_fig["iterations_ratio"]["ci90"])
        verdict = "yes" if lo >= TARGET_PCT else "no" if hi < TARGET_PCT else "not shown"
        verdicts["threads_keep_98"] = verdict
        print(
            f"\ntarget: two busy threads keep >= {TARGET_PCT:g} % under {args.rate:g} sets/s: "
            f"{run_fig['iterations_ratio']['median'] * 100:.1f} % (90 % CI {lo:.1f}-{hi:.1f}): "
            f"{verdict}"
        )
    lost_run = run_fig["threads_cpu_lost_ms_per_request"]["median"]
    lost_floor = floor_fig["threads_cpu_lost_ms_per_request"]["median"]
    if lost_run is not None and lost_floor is not None:
        verdicts["budget_ms"] = budget
        verdicts["floor_over_budget"] = lost_floor / budget
        verdicts["runctl_over_floor"] = lost_run / lost_floor if lost_floor > 0 else None
        print(
            f"budget: >= {TARGET_PCT:g} % at {args.rate:g}/s allows {budget:.2f} ms of the "
            f"threads' CPU per request; the floor costs them {lost_floor:.2f} ms "
            f"({lost_floor / budget:.1f}x the budget), runctl {lost_run:.2f} ms"
            + (f" ({lost_run / lost_floor:.2f}x the floor)" if lost_floor > 0 else "")
        )
    report = {
        "bench": "threads",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine(),
        "figures": figures,
        "verdicts": verdicts,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"threads{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out / name}")
    errors = sum(f.errors for f in results.values())
    if errors:
        print(f"{errors} requests failed", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
