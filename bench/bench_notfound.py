"""What a 404 costs: a request to a run or rank nobody serves, through the gateway.

    python -m bench.bench_notfound            # 200 samples per request kind
    python -m bench.bench_notfound --quick    # a few: checks the harness
    python -m bench notfound                  # via the bench runner

NATS answers "no responders" in about a round trip, so a write or a fresh read to a rank
that does not exist is a 404 at once, not a timeout. Each sample is one HTTP request to a
real gateway (uvicorn on a socket) on a real nats-server: ``PUT .../set/x?value=1`` and
``GET .../get?fresh=true`` to an unknown run (no responders), and ``GET .../get`` (the
registry has no record).

The bound is checked here, not in the test suite (timed assertions fail on loaded
machines): p50 at most :data:`TARGET_P50_MS`, p99 at most :data:`TARGET_P99_MS`. A miss
exits 1 (a 404 slowed by half a second fails it). Writes ``bench/results/notfound-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Final

import httpx

from bench._machine import machine
from runctl.bus.server import NatsServer
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings

__all__ = ["TARGET_P50_MS", "TARGET_P99_MS", "main"]

RESULTS: Final = Path(__file__).resolve().parent / "results"
#: a 404 is a NATS round trip plus HTTP: well under the 5 s request timeout
TARGET_P50_MS: Final = 25.0
TARGET_P99_MS: Final = 150.0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_notfound", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="a few samples; numbers are meaningless")
    p.add_argument("--samples", type=int, default=200, help="requests per kind")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.samples = 10
    return args


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def measure(http: httpx.Client, samples: int) -> dict[str, list[float]]:
    """Milliseconds per 404, by kind; any other status is an error."""
    kinds = {
        "set, unknown run": ("PUT", "/runs/bench-nowhere/ranks/0/set/x", {"value": "1"}),
        "fresh get, unknown run": ("GET", "/runs/bench-nowhere/ranks/0/get", {"fresh": "true"}),
        "registry get, unknown run": ("GET", "/runs/bench-nowhere/ranks/0/get", {}),
    }
    out: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(samples):
        for kind, (method, url, params) in kinds.items():
            started = time.perf_counter()
            r = http.request(method, url, params=params)
            elapsed = (time.perf_counter() - started) * 1000
            if r.status_code != 404:
                raise SystemExit(f"{kind}: expected 404, got {r.status_code}: {r.text[:200]}")
            out[kind].append(elapsed)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    with NatsServer() as server:
        thread = GatewayThread(Settings(nats_url=server.url, port=0)).start()
        try:
            with httpx.Client(base_url=thread.url, timeout=20) as http:
                measure(http, 3)  # warm: connections, imports
                samples = measure(http, args.samples)
        finally:
            thread.stop()
    figures: dict[str, Any] = {}
    misses: list[str] = []
    print(f"| 404 of ({args.samples} samples each) | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    for kind, values in samples.items():
        p50, p99 = statistics.median(values), percentile(values, 99)
        figures[kind] = {"p50_ms": p50, "p99_ms": p99, "max_ms": max(values), "n": len(values)}
        print(f"| {kind} | {p50:.1f} | {p99:.1f} | {max(values):.1f} |")
        if p50 > TARGET_P50_MS or p99 > TARGET_P99_MS:
            misses.append(f"{kind}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    ok = not misses
    print(
        f"\ntarget: p50 <= {TARGET_P50_MS:g} ms and p99 <= {TARGET_P99_MS:g} ms: "
        + ("met" if ok else "MISSED (" + "; ".join(misses) + ")")
    )
    report = {
        "bench": "notfound",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": machine(),
        "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS, "met": ok},
        "figures": figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"notfound{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out / name}")
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
