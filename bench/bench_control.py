"""Control path, runctl side by side with Freak 0.0.2.

    python -m bench.bench_control            # full run (~10 min on 2 cores)
    python -m bench.bench_control --quick    # tiny sizes: checks the harness end to end
    python -m bench control --rounds 5       # via the bench runner

Prints a markdown table (Freak, runctl, their ratio, the targets) and writes every
figure's median, p99 and spread over rounds, plus machine and version facts, to
``bench/results/control-<time>.json``. See docs/performance.md for what is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from bench.control.procs import BenchError
from bench.control.report import evaluate, render
from bench.control.runner import Config, Run

__all__ = ["main", "parse"]

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str]) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_control", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (seconds, not minutes); numbers are meaningless",
    )
    parser.add_argument("--tools", default="freak,runctl")
    parser.add_argument("--modes", default="sleep,release,hold")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--window", type=float, help="seconds per loop-rate window")
    parser.add_argument(
        "--rate-pairs",
        type=int,
        help="per mode, tool and round: windows under 100 GET/s, each between idle ones",
    )
    parser.add_argument("--n", type=int, help="GETs per latency figure per round")
    parser.add_argument("--sets", type=int, help="sets per round")
    parser.add_argument("--startup-repeats", type=int)
    parser.add_argument(
        "--threads-pairs",
        type=int,
        help="per round: runs of three windows (idle, 100 sets/s, idle after a quiet spell) "
        "of the two-busy-threads program with runctl, each between two windows without a "
        "tool (0: skip)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run every benchmark process at this niceness (negative needs root): on a "
        "machine shared with other work, e.g. -5 keeps that work from dominating the figures",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="K=V",
        help="extra environment for the gateway (experiments)",
    )
    parser.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="K=V",
        help="extra environment for the runctl program (experiments)",
    )
    args = parser.parse_args(argv)
    cfg = Config(
        tools=_list(args.tools, ("freak", "runctl")),
        modes=_list(args.modes, ("sleep", "release", "hold")),
        keep=args.keep,
    )
    if args.quick:
        cfg.rounds, cfg.window, cfg.settle, cfg.n, cfg.sets = 1, 0.25, 0.05, 20, 10
        cfg.startup_repeats, cfg.startup_settle, cfg.throughput_s = 1, 0.1, 0.3
        cfg.threads_pairs, cfg.threads_window, cfg.threads_settle = 2, 0.2, 0.05
        cfg.threads_quiet, cfg.threads_restart_settle = 0.1, 0.05
        cfg.rate_pairs = 1
    for name in ("rounds", "window", "rate_pairs", "n", "sets", "startup_repeats", "threads_pairs"):
        if (value := getattr(args, name)) is not None:
            setattr(cfg, name, value)
    cfg.nice = args.nice
    cfg.gateway_env = _env(args.gateway_env)
    cfg.agent_env = _env(args.agent_env)
    return cfg, args


def _list(text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"choose from {', '.join(allowed)}; got {text!r}")
    return items


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected K=V, got {pair!r}")
        env[key] = value
    return env


def _clean(value: Any) -> Any:
    """JSON has no NaN: a figure that could not be measured is null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(list(sys.argv[1:] if argv is None else argv))
    run = Run(cfg)
    try:
        run.execute()
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    targets = evaluate(run.figs, cfg.modes, cfg.tools)
    table = render(run.figs, targets, [*cfg.modes, "threads"], cfg.tools)
    m = run.meta["machine"]
    print(
        f"\nControl path: runctl vs Freak 0.0.2 - {cfg.rounds} round(s), "
        f"{m['nproc']} cores ({m['cpu']}), Python {m['python']}, load average "
        f"{m['loadavg_start'][0]:.2f} -> {run.meta['loadavg_end'][0]:.2f}"
    )
    print("cells: median [min-max of the rounds' medians], p99 over all samples\n")
    print(table)
    for note in run.notes:
        print(f"note: {note}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"control-{'quick-' if args.quick else ''}{stamp}.json"
    doc = {
        **run.meta,
        "notes": run.notes,
        "figures": {k: f.to_json() for k, f in sorted(run.figs.items())},
        "targets": [t.to_json() for t in targets],
        "table": table,
    }
    path.write_text(json.dumps(_clean(doc), indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
