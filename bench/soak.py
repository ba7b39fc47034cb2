"""Soak: mixed HTTP load on the gateway while ranks log steps as fast as they can; checks that
nothing fails and that memory stays flat in the agents and the gateway.

    python -m bench.soak                      # 60 s (``just soak``)
    python -m bench.soak --seconds 10 --concurrency 4 --step-rate 100

Everything is a real process: nats-server, the gateway (``runctl gateway``) and the ranks
(``control()`` + a loop logging ``--step-rate`` steps per second, pipelined). The load is
closed-loop (``--concurrency`` clients, each sending its next request when the last one
answered), so requests/s is what this machine sustains. Mix: 50 % reads from the registry,
15 % fresh reads (the rank answers), 20 % sets, 10 % patches, 5 % step-log reads
(``GET /runs/RUN/steps?limit=20``). The gateway waits up to 10 s for a rank
(``--timeout 10``): the soak judges failures and memory; latency is only reported.

Memory: resident set size of the gateway and each rank, sampled every second; "start" is
after a warm-up (a fifth of the run, at least 3 s), "end" the last sample. Exit code 1 if a
request failed, a step was lost, or memory grew more than ``--max-growth`` (default: 20 %
plus 8 MiB). ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

__all__ = ["SoakResult", "main", "run_soak"]

ROOT = Path(__file__).resolve().parent.parent
RUN = "soak"
#: step keys cycle through this many, so the log (one record per step) stays this size
KEYS = 2000

RANK = textwrap.dedent("""
    import json, os, time
    from pydantic import BaseModel, Field
    from runctl.agent import control

    class Opt(BaseModel):
        lr: float = Field(0.1, gt=0)
        momentum: float = 0.9

    class S(BaseModel):
        step: int = 0
        opt: Opt = Opt()
        note: str = ""

    state = S()
    ctl = control(state, run=os.environ["RUN"], rank=os.environ["RANK_"],
                  url=os.environ["URL"], heartbeat=0.5)
    ctl.wait_ready(60)
    os.write(1, b"READY\\n")
    keys, rate, i = int(os.environ["KEYS"]), float(os.environ["STEP_RATE"]), 0
    start = time.monotonic()
    while not ctl.stop_requested:
        with ctl.lock:
            state.step = i
        # pipelined completions, with one waited acknowledgement in a hundred
        ctl.done("tick", i % keys, wait=i % 100 == 0)
        i += 1
        ahead = start + i / rate - time.monotonic()  # the program's own work, paced
        if ahead > 0:
            time.sleep(ahead)
    flushed = ctl.agent.steps.flush(30)
    os.write(1, (json.dumps({"steps": i, "flushed": flushed,
                             "pending": ctl.agent.steps.pending}) + "\\n").encode())
    ctl.close()
""")


@dataclass
class SoakResult:
    seconds: float
    concurrency: int
    ranks: int
    step_rate: float = 0.0
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    rss_kib: dict[str, list[int]] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    steps_stored: int = 0
    errors: list[str] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if not status.startswith("2"))

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def memory(self) -> dict[str, dict[str, int]]:
        warm = max(3, int(len(next(iter(self.rss_kib.values()), [])) / 5))
        out = {}
        for name, samples in self.rss_kib.items():
            start = samples[min(warm, len(samples) - 1)]
            out[name] = {"start_kib": start, "end_kib": samples[-1], "max_kib": max(samples)}
        return out

    def growth_ok(self, ratio: float, slack_kib: int) -> bool:
        return all(
            m["end_kib"] <= m["start_kib"] * (1 + ratio) + slack_kib for m in self.memory().values()
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "concurrency": self.concurrency,
            "ranks": self.ranks,
            "requests": self.requests,
            "requests_per_s": round(self.rate, 1),
            "failed": self.failed,
            "statuses": dict(self.statuses),
            "mix": dict(self.by_kind),
            "latency_ms": {
                kind: _percentiles(values) for kind, values in sorted(self.latency.items())
            },
            "step_rate_target": self.step_rate,
            "steps_logged": self.steps,
            "steps_per_s": round(sum(self.steps.values()) / self.seconds, 1),
            "step_records_stored": self.steps_stored,
            "memory": self.memory(),
            # one sample every 10 s: a trend shows here
            "memory_every_10s_kib": {name: s[::10] for name, s in self.rss_kib.items()},
            "errors": self.errors[:20],
        }


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def ms(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50": ms(0.5), "p99": ms(0.99)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not answering after {timeout:g}s")


async def _load(base: str, result: SoakResult, until: float, worker: int) -> None:
    rng = random.Random(worker)  # noqa: S311 - the same request mix every run
    rank_path = f"/runs/{RUN}/ranks"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        n = 0
        while time.monotonic() < until:
            n += 1
            rank = str(rng.randrange(result.ranks))
            roll = rng.random()
            if roll < 0.50:
                kind, req = "get", http.get(f"{rank_path}/{rank}/get")
            elif roll < 0.65:
                kind, req = (
                    "get_fresh",
                    http.get(f"{rank_path}/{rank}/get/opt/lr", params={"fresh": "true"}),
                )
            elif roll < 0.85:
                value = round(0.001 + rng.random(), 4)
                kind, req = (
                    "set",
                    http.put(f"{rank_path}/{rank}/set/opt.lr", params={"value": str(value)}),
                )
            elif roll < 0.95:
                kind, req = (
                    "patch",
                    http.patch(f"{rank_path}/{rank}/set", json={"note": f"w{worker}-{n}"}),
                )
            else:
                kind, req = (
                    "steps",
                    http.get(f"/runs/{RUN}/steps", params={"rank": rank, "limit": "20"}),
                )
            began = time.perf_counter()
            try:
                status = str((await req).status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            result.latency[kind].append(time.perf_counter() - began)
            result.requests += 1
            result.statuses[status] += 1
            result.by_kind[kind] += 1
            if not status.startswith("2") and len(result.errors) < 100:
                result.errors.append(f"{kind} rank {rank}: {status}")


#: seconds a rank may take to print READY (its agent connected and loaded its step log)
READY_WITHIN = 40.0


def _wait_ready_line(name: str, proc: subprocess.Popen[bytes], log: Path, within: float) -> None:
    """Until ``proc`` prints READY (the agent logs to stdout too, from its own thread);
    otherwise fail with what it printed, not hang on its pipe."""
    assert proc.stdout is not None
    stdout = proc.stdout
    seen: list[bytes] = []
    ready = threading.Event()

    def read() -> None:
        for line in stdout:
            # the agent thread's log line may share the line: "... url=nats://...READY"
            if line.rstrip().endswith(b"READY"):
                ready.set()
                return
            seen.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(within)
    if ready.is_set():
        return
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    reader.join(5)
    output = b"".join(seen).decode(errors="replace")[-3000:]
    errors = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(
        f"{name} did not print READY within {within:g}s (exit {proc.returncode}):\n"
        f"stdout:\n{output}\nstderr:\n{errors}"
    )


def run_soak(
    seconds: float = 60.0,
    *,
    concurrency: int = 8,
    ranks: int = 2,
    step_rate: float = 200.0,
    workdir: Path | None = None,
) -> SoakResult:
    from runctl.bus.server import NatsServer

    tmp = tempfile.TemporaryDirectory(prefix="runctl-soak-") if workdir is None else None
    work = Path(tmp.name) if tmp is not None else Path(workdir or ".")
    result = SoakResult(seconds, concurrency, ranks, step_rate)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    server = NatsServer(store_dir=work / "nats").start()
    try:
        env = {
            **os.environ,
            "RUN": RUN,
            "URL": server.url,
            "KEYS": str(KEYS),
            "STEP_RATE": str(step_rate),
            "PYTHONUNBUFFERED": "1",
        }
        for r in range(ranks):
            with (work / f"rank{r}.log").open("wb") as log:
                procs[f"rank{r}"] = subprocess.Popen(
                    [sys.executable, "-c", RANK],
                    cwd=ROOT,
                    env={**env, "RANK_": str(r)},
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
        port = _free_port()
        with (work / "gateway.log").open("wb") as log:
            procs["gateway"] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "runctl",
                    "gateway",
                    "--nats",
                    server.url,
                    "--port",
                    str(port),
                    "--no-access-log",
                    "--log-level",
                    "warning",
                    # correctness under load, not latency (reported separately): a slow
                    # answer on a starved machine is not a failure
                    "--timeout",
                    "10",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        for name, proc in procs.items():
            if name.startswith("rank"):
                _wait_ready_line(name, proc, work / f"{name}.log", READY_WITHIN)
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/runs")
        result.rss_kib = {name: [] for name in procs}

        async def drive() -> None:
            start = time.monotonic()
            until = start + seconds
            async with anyio.create_task_group() as tg:
                for w in range(concurrency):
                    tg.start_soon(_load, base, result, until, w)
                while time.monotonic() < until:
                    for name, proc in procs.items():
                        result.rss_kib[name].append(_rss_kib(proc.pid))
                    await anyio.sleep(1.0)
            result.seconds = time.monotonic() - start

        anyio.run(drive)
        # stop the ranks through the gateway, as an operator would
        stop = httpx.post(f"{base}/runs/{RUN}/ranks/all/stop", timeout=30)
        if stop.status_code != 200:
            result.errors.append(f"stop: {stop.status_code} {stop.text[:200]}")
        for name, proc in procs.items():
            if name.startswith("rank"):
                out, _ = proc.communicate(timeout=60)
                final = json.loads(out.decode().strip().splitlines()[-1])
                result.steps[name] = int(final["steps"])
                if not final["flushed"] or final["pending"]:
                    result.errors.append(f"{name}: {final['pending']} completions unflushed")
        # one record per (rank, key): every completion of every rank is in the log
        result.steps_stored = _stored_records(server.url)
        expected = sum(min(KEYS, steps) for steps in result.steps.values())
        if result.steps_stored != expected:
            result.errors.append(f"{result.steps_stored} step records stored, expected {expected}")
        return result
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        server.stop()
        if tmp is not None:
            tmp.cleanup()


def _stored_records(url: str) -> int:
    import nats

    from runctl.bus.steps.store import read_log

    async def go() -> int:
        nc = await nats.connect(url)
        try:
            return len((await read_log(nc, RUN)).records)
        finally:
            await nc.close()

    return anyio.run(go)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--step-rate",
        type=float,
        default=200.0,
        metavar="PER_S",
        help="steps per second each rank logs (default: 200)",
    )
    parser.add_argument("--max-growth", type=float, default=0.20, metavar="RATIO")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args(argv)
    result = run_soak(
        args.seconds, concurrency=args.concurrency, ranks=args.ranks, step_rate=args.step_rate
    )
    figures = result.to_json()
    flat = result.growth_ok(args.max_growth, 8 * 1024)
    figures["memory_flat"] = flat
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    ok = not result.failed and not result.errors and flat
    print(
        f"soak: {result.requests} requests in {result.seconds:.0f}s "
        f"({result.rate:.0f}/s), {result.failed} failed; steps "
        f"{sum(result.steps.values())}; memory {'flat' if flat else 'GREW'}: "
        + ", ".join(
            f"{k} {v['start_kib'] // 1024}->{v['end_kib'] // 1024} MiB"
            for k, v in result.memory().items()
        ),
        file=sys.stderr,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
