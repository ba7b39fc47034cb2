"""Run every benchmark: each ``bench/bench_*.py`` module's ``main(argv)``.

python -m bench                  # all of them, default sizes
python -m bench control --quick  # only bench_control, with its own arguments
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

__all__ = ["discover", "main"]


def discover() -> list[str]:
    """Module names of every benchmark, in file-name order."""
    here = Path(__file__).resolve().parent
    return sorted(p.stem for p in here.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    names = discover()
    if args and not args[0].startswith("-"):
        wanted = args.pop(0)
        names = [n for n in names if wanted in (n, n.removeprefix("bench_"))]
        if not names:
            print(f"no benchmark named {wanted!r}; have: {', '.join(discover())}", file=sys.stderr)
            return 2
    failed = []
    for name in names:
        print(f"== {name} ==", flush=True)
        started = time.monotonic()
        module = importlib.import_module(f"bench.{name}")
        code = module.main(args)
        print(
            f"== {name}: {'ok' if not code else f'exit {code}'} "
            f"in {time.monotonic() - started:.0f}s ==",
            flush=True,
        )
        if code:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
