"""Change journal: replay at start, and what journaling costs a set and the program's loop.

    python -m bench.bench_journal            # full run (~2 min on 2 cores)
    python -m bench.bench_journal --quick    # tiny sizes: checks the harness end to end
    python -m bench journal                  # via the bench runner

Measures, against a real nats-server (file storage, loopback):

- replay: a run with N journaled changes (default 10,000: sets, patches, an occasional
  reset); how long an agent takes from start to ready with replay on and with replay off
  (the difference is the replay: read, plan, validate and apply every change);
- set latency with journaling on and off, in alternating rounds: a rank process whose loop
  sleeps (``sleep``) or holds the GIL in pure Python (``hold``), sets sent one after the
  other by ``bus.Client`` (each answered only once the journal holds the rank's record);
  "off" is the same agent with its journal never opened (the rank keeps no record and the
  client waits for none: runctl before the journal);
- the program's loop rate while 100 sets/s arrive, journaling on and off, relative to the
  same loop undisturbed.

Prints a table and writes ``bench/results/journal-<time>.json`` with machine facts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from pydantic import BaseModel

from bench._machine import cpu_model, nats_server_version, package_version
from runctl.agent import Agent
from runctl.bus import messages as m
from runctl.bus.client import Client
from runctl.bus.journal import FieldChange, Record, encode_record, request_json
from runctl.bus.journalstore import ensure_journal
from runctl.bus.server import NatsServer
from runctl.bus.subjects import journal_subject

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"replay_10k_s": 1.0}
ROOT = Path(__file__).resolve().parent.parent


class Opt(BaseModel):
    lr: float = 0.001
    momentum: float = 0.9
    schedule: str = "cosine"


class State(BaseModel):
    lr: float = 0.001
    batch_size: int = 32
    name: str = "bench"
    optimizer: Opt = Opt()
    tags: dict[str, int] = {}


#: the rank process: counts loop iterations, sleeps or holds the GIL, journal on or off
RANK = """
    import os, sys, time
    from pydantic import BaseModel
    from runctl import control
    if os.environ.get("BENCH_NO_JOURNAL") == "1":
        from runctl.agent import journaling
        async def never(self, nc, **kw):
            return False
        journaling.Journaler.open = never  # the agent as it was before the journal
    class S(BaseModel):
        lr: float = 0.001
        step: int = 0
    state = S()
    ctl = control(state, heartbeat=1.0)
    ctl.wait_ready(30)
    print("READY", flush=True)
    hold = os.environ.get("MODE") == "hold"
    count, window = 0, time.monotonic()
    while not ctl.stop_requested:
        if hold:
            x = 0
            for i in range(8000):
                x += i
        else:
            time.sleep(0.002)
        count += 1
        now = time.monotonic()
        if now - window >= 0.5:
            print("RATE", count / (now - window), flush=True)
            count, window = 0, now
    ctl.close()
"""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_journal", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes; numbers are meaningless")
    p.add_argument("--changes", type=int, default=10_000, help="journaled changes to replay")
    p.add_argument("--sets", type=int, default=300, help="sets per latency round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.changes, args.sets, args.rounds = 300, 30, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    results: dict[str, Any] = {}
    with NatsServer() as server:
        results["replay"] = asyncio.run(bench_replay(server.url, args.changes, args.rounds))
        results["set"] = asyncio.run(bench_set(server.url, args.sets, args.rounds))
        results["loop_rate"] = asyncio.run(bench_loop_rate(server.url, 1 if args.quick else 3))
    report = {
        "bench": "journal",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "nats_server": nats_server_version(),
            "nats_py": package_version("nats-py"),
            "pydantic": package_version("pydantic"),
        },
        "targets": TARGETS,
        "results": results,
    }
    print(render(report))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"journal{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.out / name}")
    return 0


# --- replay --------------------------------------------------------------------------------


async def populate(url: str, run: str, n: int) -> None:
    """``n`` journaled changes of rank 0, as agents write them (every 500th a reset)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_journal(js)
        now = time.time()
        for i in range(n):
            cmd: m.Command
            if i % 500 == 499:
                cmd = m.Reset()
            elif i % 3 == 0:
                cmd = m.Patch(value={"optimizer": {"lr": 0.001 + i * 1e-7}, "batch_size": 32 + i})
            else:
                cmd = m.Set(path="lr", value=0.001 + i * 1e-7)
            record = Record(
                id=uuid.uuid4().hex,
                run=run,
                rank="0",
                target="0",
                verb={m.Set: "set", m.Patch: "patch", m.Reset: "reset"}[type(cmd)],
                ts=now + i * 1e-3,
                by=m.Author(name="bench@host", via="python"),
                request=request_json(cmd),
                outcome="applied",
                version_before=i,
                version_after=i + 1,
                diff=[FieldChange(path="lr", before=0.001, after=0.002)],
            )
            await js.publish_async(journal_subject(run, "0", record.id), encode_record(record))
            if i % 5000 == 4999:
                await asyncio.wait_for(js.publish_async_completed(), 60)
        await asyncio.wait_for(js.publish_async_completed(), 60)
    finally:
        await nc.close()


async def bench_replay(url: str, n: int, rounds: int) -> dict[str, Any]:
    run = f"bench-replay-{os.getpid()}"
    await populate(url, run, n)
    on: list[float] = []
    off: list[float] = []
    applied = 0
    for _ in range(rounds):
        for replay in (True, False):
            t = time.perf_counter()
            async with Agent(State(), run=run, rank=0, url=url, heartbeat=60, replay=replay) as a:
                elapsed = time.perf_counter() - t
                if replay:
                    applied = len(a.replay_report.replayed)
                    if applied != n or a.replay_report.skipped:
                        raise RuntimeError(f"replayed {applied} of {n} changes")
            (on if replay else off).append(elapsed)
    return {
        "changes": n,
        "replayed": applied,
        "ready_with_replay_s": _stats(on),
        "ready_without_replay_s": _stats(off),
        "replay_s": round(statistics.median(on) - statistics.median(off), 4),
    }


# --- set latency and loop rate ------------------------------------------------------------


class Rank:
    def __init__(self, url: str, run: str, mode: str, journal: bool) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RUNCTL_RUN": run,
            "RUNCTL_RANK": "0",
            "RUNCTL_NATS_URL": url,
            "MODE": mode,
            "BENCH_NO_JOURNAL": "0" if journal else "1",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(RANK)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    async def line(self, prefix: str, timeout: float = 60) -> str:
        """The rank's next line with ``prefix``. runctl's log lines go to the same stdout
        from the agent's thread, so one may share the line (``... url=...READY``)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                text = await asyncio.to_thread(self.proc.stdout.readline)
                if not text:
                    raise RuntimeError(f"bench rank exited ({self.proc.poll()})")
                if prefix in text:
                    return text[text.index(prefix) :].strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def bench_set(url: str, sets: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with await Client.connect(url, by="bench") as client:
        for mode in ("sleep", "hold"):
            samples: dict[str, list[float]] = {"on": [], "off": []}
            for r in range(rounds):
                for journal in (True, False) if r % 2 == 0 else (False, True):
                    run = f"bench-set-{os.getpid()}-{mode}-{r}-{int(journal)}"
                    rank = Rank(url, run, mode, journal)
                    try:
                        await rank.line("READY")
                        for i in range(20):  # warm up
                            await client.set(run, 0, "lr", 0.5 + i * 1e-6)
                        for i in range(sets):
                            t = time.perf_counter()
                            res = await client.set(run, 0, "lr", 0.1 + i * 1e-6)
                            samples["on" if journal else "off"].append(time.perf_counter() - t)
                            if res.journaled is not (True if journal else None):
                                raise RuntimeError(f"journaled={res.journaled} with {journal=}")
                    finally:
                        rank.close()
            out[mode] = {
                key: {
                    "p50_ms": round(statistics.median(v) * 1000, 3),
                    "p90_ms": round(_pct(v, 90) * 1000, 3),
                    "n": len(v),
                }
                for key, v in samples.items()
            }
    return out


async def bench_loop_rate(url: str, seconds: float) -> dict[str, Any]:
    """Loop iterations per second of a GIL-holding rank while 100 sets/s arrive, relative
    to the same rank undisturbed just before."""
    out: dict[str, Any] = {}
    async with await Client.connect(url, by="bench") as client:
        for journal in (True, False):
            run = f"bench-rate-{os.getpid()}-{int(journal)}"
            rank = Rank(url, run, "hold", journal)
            try:
                await rank.line("READY")
                idle = await _rates(rank, seconds)
                busy: list[float] = []
                task = asyncio.create_task(_keep_setting(client, run))
                try:
                    busy = await _rates(rank, seconds)
                finally:
                    task.cancel()
                out["on" if journal else "off"] = {
                    "idle_per_s": round(statistics.median(idle), 1),
                    "under_sets_per_s": round(statistics.median(busy), 1),
                    "ratio": round(statistics.median(busy) / statistics.median(idle), 4),
                }
            finally:
                rank.close()
    return out


async def _keep_setting(client: Client, run: str) -> None:
    """About 100 sets a second until cancelled."""
    i = 0
    while True:
        await client.set(run, 0, "lr", 0.1 + i * 1e-6)
        i += 1
        await asyncio.sleep(0.01)


async def _rates(rank: Rank, seconds: float) -> list[float]:
    rates = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rates.append(float((await rank.line("RATE")).split()[1]))
    return rates


# --- output ----------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def _pct(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def render(report: dict[str, Any]) -> str:
    r = report["results"]
    replay = r["replay"]
    lines = [
        f"replay of {replay['changes']:,} journaled changes at start: "
        f"{replay['replay_s']:.3f} s (ready {replay['ready_with_replay_s']['median']:.3f} s "
        f"with replay, {replay['ready_without_replay_s']['median']:.3f} s without; "
        f"target < {TARGETS['replay_10k_s']} s)",
        "",
        "| set one field | journal on p50 / p90 | journal off p50 / p90 |",
        "|---|---|---|",
    ]
    for mode, figs in r["set"].items():
        on, off = figs["on"], figs["off"]
        lines.append(
            f"| {mode} loop | {on['p50_ms']:.2f} / {on['p90_ms']:.2f} ms "
            f"| {off['p50_ms']:.2f} / {off['p90_ms']:.2f} ms |"
        )
    rate = r["loop_rate"]
    lines += [
        "",
        "| hold loop under 100 sets/s | journal on | journal off |",
        "|---|---|---|",
        f"| rate vs undisturbed | {rate['on']['ratio']:.1%} | {rate['off']['ratio']:.1%} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
