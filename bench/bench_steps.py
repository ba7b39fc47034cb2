"""Completed-step log: completion throughput, resume time, done-check cost.

    python -m bench.bench_steps              # full run (~1 min on 2 cores)
    python -m bench.bench_steps --quick      # tiny sizes: checks the harness end to end
    python -m bench steps                    # via the bench runner

Measures, against a real nats-server (file storage, loopback):

- completions per second from a sync program: ``wait=True`` (each completion waits for its
  PubAck before the loop goes on) and ``wait=False`` (batched: pipelined, then ``flush()``);
- resume time with 10k and 100k logged steps: loading a rank's log (``StepLog.open``:
  ensure the stream, subscribe, read back every record), and a whole ``control()`` start to
  ``wait_ready()`` for context;
- the done-check on the program's thread: ``ctl.is_done(name, key)``, with a pre-hashed and
  with a raw config, and the iterator's per-item cost when every item is already done.

Prints a table and writes ``bench/results/steps-<time>.json`` with machine facts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
from pydantic import BaseModel

from bench._machine import nats_server_version, package_version
from runctl.agent import control
from runctl.agent.steps.log import StepLog
from runctl.bus.canonical import hashed, key_digest
from runctl.bus.server import NatsServer
from runctl.bus.steps.records import StepRecord, encode_entry
from runctl.bus.steps.store import ensure_stream
from runctl.bus.subjects import step_record_subject

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"resume_100k_s": 2.0, "done_check_us": 5.0}
CONFIG = {
    "lr": 0.001,
    "batch_size": 256,
    "model": {"depth": 12, "width": 768},
    "data": "/datasets/shards",
    "_workers": 8,
}


class State(BaseModel):
    lr: float = 0.001


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_steps", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes; numbers are meaningless")
    p.add_argument("--resume-sizes", default="10000,100000")
    p.add_argument("--sync", type=int, default=3000, help="completions, wait=True")
    p.add_argument("--batched", type=int, default=20000, help="completions, wait=False")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.resume_sizes, args.sync, args.batched, args.rounds = "500,2000", 100, 500, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    sizes = [int(s) for s in args.resume_sizes.split(",") if s]
    results: dict[str, Any] = {}
    with NatsServer() as server:
        url = server.url
        results["completions"] = bench_completions(url, args.sync, args.batched, args.rounds)
        results["resume"] = {str(n): bench_resume(url, n, args.rounds) for n in sizes}
        results["done_check"] = bench_done_check(url, min(sizes[-1], 10000))
    report = {
        "bench": "steps",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": machine(),
        "targets": TARGETS,
        "results": results,
    }
    print(render(report))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"steps{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {path}")
    return 0


# --- measurements --------------------------------------------------------------------


def bench_completions(url: str, n_sync: int, n_batched: int, rounds: int) -> dict[str, Any]:
    sync_rates, batched_rates = [], []
    for r in range(rounds):
        with control(State(), run=f"bench-c{os.getpid()}-{r}", rank=0, url=url) as ctl:
            ctl.wait_ready()
            t = time.perf_counter()
            for _ in ctl.steps("sync", range(n_sync), config=CONFIG):
                pass
            sync_rates.append(n_sync / (time.perf_counter() - t))
            t = time.perf_counter()
            for _ in ctl.steps("batched", range(n_batched), config=CONFIG, wait=False):
                pass
            if not ctl.agent.steps.flush(120):
                raise RuntimeError("batched completions not acknowledged")
            batched_rates.append(n_batched / (time.perf_counter() - t))
    return {
        "sync_per_s": _stats(sync_rates),
        "batched_per_s": _stats(batched_rates),
        "n_sync": n_sync,
        "n_batched": n_batched,
    }


def bench_resume(url: str, n: int, rounds: int) -> dict[str, Any]:
    run = f"bench-r{os.getpid()}-{n}"
    asyncio.run(populate(url, run, n))
    loads, cpus, starts = [], [], []
    for _ in range(rounds):
        wall, cpu = asyncio.run(load_once(url, run, n))
        loads.append(wall)
        cpus.append(cpu)
        t = time.perf_counter()
        with control(State(), run=run, rank=0, url=url) as ctl:
            ctl.wait_ready(60)
            starts.append(time.perf_counter() - t)
            assert ctl.is_done("epoch", n - 1, config=CONFIG)
    return {
        "steps": n,
        "load_s": _stats(loads),
        "load_cpu_s": _stats(cpus),
        "control_ready_s": _stats(starts),
    }


async def populate(url: str, run: str, n: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        cfg = hashed(CONFIG)
        now = time.time()
        for start in range(0, n, 5000):
            for i in range(start, min(n, start + 5000)):
                key, khash = key_digest(i)
                rec = StepRecord(
                    run=run,
                    scope="0",
                    name="epoch",
                    key=key,
                    key_hash=khash,
                    config=cfg.value,
                    config_hash=cfg.hash,
                    status="done",
                    started=now + i * 1e-3,
                    ended=now + i * 1e-3 + 0.5,
                    duration=0.5,
                    result={"loss": 1.0 / (i + 1)},
                    rank="0",
                    host="bench",
                    pid=1,
                    msg_id=f"{run}-{i}",
                )
                await js.publish_async(
                    step_record_subject(run, "0", "epoch", rec.id), encode_entry(rec)
                )
            await asyncio.wait_for(js.publish_async_completed(), 60)
    finally:
        await nc.close()


async def load_once(url: str, run: str, n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread, which runs the whole read-back)."""
    nc = await nats.connect(url)
    try:
        t, c = time.perf_counter(), time.thread_time()
        log = await StepLog.open(nc, run=run, rank="0", host="bench", pid=2)
        elapsed = time.perf_counter() - t, time.thread_time() - c
        if len(log.index["0"]) != n:
            raise RuntimeError(f"loaded {len(log.index['0'])} of {n} records")
        await log.aclose()
        return elapsed
    finally:
        await nc.close()


def bench_done_check(url: str, n: int) -> dict[str, Any]:
    run = f"bench-d{os.getpid()}"
    with control(State(), run=run, rank=0, url=url) as ctl:
        ctl.wait_ready()
        for _ in ctl.steps("epoch", range(n), config=CONFIG, wait=False):
            pass
        ctl.agent.steps.flush(120)
        pre = hashed(CONFIG)
        small = {"lr": 0.1, "epochs": 10}
        for _ in ctl.steps("small", range(n), config=small, wait=False):
            pass
        ctl.agent.steps.flush(120)
        checks: dict[str, Any] = {}
        for name, fn in (
            ("is_done_no_config_us", lambda i: ctl.is_done("plain", i)),
            ("is_done_prehashed_config_us", lambda i: ctl.is_done("epoch", i, config=pre)),
            ("is_done_raw_small_config_us", lambda i: ctl.is_done("small", i, config=small)),
        ):
            checks[name], checks[name.replace("_us", "_cpu_us")] = _per_call(fn, n)
        assert ctl.is_done("epoch", n - 1, config=pre)

        def skip_all(_: int) -> None:
            for _ in ctl.steps("epoch", range(n), config=CONFIG):
                raise RuntimeError("every item is done: nothing may run")

        wall, cpu = _per_call(skip_all, 1)
        checks["iterator_skip_per_item_us"] = {k: v / n for k, v in wall.items()}
        checks["iterator_skip_per_item_cpu_us"] = {k: v / n for k, v in cpu.items()}
    return checks


def _per_call(fn: Callable[[int], Any], n: int) -> tuple[dict[str, float], dict[str, float]]:
    """Microseconds per call: wall clock, and CPU time of this thread (less disturbed by
    other processes on a shared machine)."""
    walls, cpus = [], []
    for _ in range(3):
        t, c = time.perf_counter(), time.thread_time()
        for i in range(n):
            fn(i)
        walls.append((time.perf_counter() - t) / n * 1e6)
        cpus.append((time.thread_time() - c) / n * 1e6)
    return _stats(walls), _stats(cpus)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --- report --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "nats_server": nats_server_version(),
        "nats_py": package_version("nats-py"),
        "msgspec": msgspec.__version__,
        "load_average": os.getloadavg(),
    }


def render(report: dict[str, Any]) -> str:
    r = report["results"]
    c, d = r["completions"], r["done_check"]
    rows = [("measure", "median", "cpu median", "min .. max", "target")]
    rows.append(
        (f"completions/s, wait=True (n={c['n_sync']})", *_fmt(c["sync_per_s"], "{:,.0f}"), "")
    )
    rows.append(
        (
            f"completions/s, wait=False + flush (n={c['n_batched']})",
            *_fmt(c["batched_per_s"], "{:,.0f}"),
            "",
        )
    )
    for n, res in r["resume"].items():
        target = f"< {TARGETS['resume_100k_s']:g} s" if int(n) >= 100_000 else ""
        rows.append(
            (
                f"resume: load {int(n):,} steps (s)",
                *_fmt(res["load_s"], "{:.3f}", res.get("load_cpu_s")),
                target,
            )
        )
        rows.append(
            (
                f"resume: control() to ready, {int(n):,} steps (s)",
                *_fmt(res["control_ready_s"], "{:.3f}"),
                "",
            )
        )
    for name, label in (
        ("is_done_no_config_us", "is_done(name, key) (us)"),
        ("is_done_prehashed_config_us", "is_done(..., config=hashed) (us)"),
        ("is_done_raw_small_config_us", "is_done(..., config=dict) (us)"),
        ("iterator_skip_per_item_us", "steps() skipping a done item (us)"),
    ):
        target = (
            f"< {TARGETS['done_check_us']:g} us" if name != "is_done_raw_small_config_us" else ""
        )
        rows.append(
            (label, *_fmt(d[name], "{:.2f}", d.get(name.replace("_us", "_cpu_us"))), target)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    m = report["machine"]
    load = ", ".join(f"{x:.1f}" for x in m["load_average"])
    return (
        f"step log benchmark ({m['cpus']} cpus, load average {load}, {m['nats_server']}, "
        f"python {m['python']})\n" + "\n".join(lines)
    )


def _fmt(
    stats: dict[str, float], spec: str, cpu: dict[str, float] | None = None
) -> tuple[str, str, str]:
    return (
        spec.format(stats["median"]),
        spec.format(cpu["median"]) if cpu else "",
        f"{spec.format(stats['min'])} .. {spec.format(stats['max'])}",
    )


if __name__ == "__main__":
    raise SystemExit(main())
