"""Statistics, targets and the printed table of the control-path benchmark.

A *figure* is one measured quantity for one tool (and loop mode). Latencies pool the
samples of every round: ``p50``/``p99`` of the pool; ``spread`` is the [min, max] of the
rounds' own medians, which shows how much a figure moved between repeats of the run.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Figure", "Target", "evaluate", "median_interval", "percentile", "render"]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median_interval(
    values: list[float], confidence: float = 0.9, resamples: int = 2000
) -> tuple[float, float]:
    """A bootstrap confidence interval of the median of ``values`` (percentile method,
    fixed seed so a result file reproduces its own verdicts)."""
    if len(values) < 2:
        return (math.nan, math.nan)
    rng = random.Random(0)  # noqa: S311 - resampling for statistics, not secrets
    n = len(values)
    medians = [statistics.median(rng.choices(values, k=n)) for _ in range(resamples)]
    tail = (1 - confidence) / 2 * 100
    return (percentile(medians, tail), percentile(medians, 100 - tail))


@dataclass
class Figure:
    """Samples of one quantity, kept per round."""

    unit: str
    rounds: list[list[float]] = field(default_factory=list)

    def add_round(self, samples: list[float]) -> None:
        self.rounds.append(list(samples))

    @property
    def pooled(self) -> list[float]:
        return [v for r in self.rounds for v in r]

    @property
    def p50(self) -> float:
        return statistics.median(self.pooled) if self.pooled else math.nan

    @property
    def p99(self) -> float:
        return percentile(self.pooled, 99)

    @property
    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds if r]

    @property
    def spread(self) -> tuple[float, float]:
        meds = self.round_medians
        return (min(meds), max(meds)) if meds else (math.nan, math.nan)

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "median": self.p50,
            "p99": self.p99,
            "spread": list(self.spread),
            "round_medians": self.round_medians,
            "samples": len(self.pooled),
        }


@dataclass
class Target:
    name: str
    value: float
    limit: float
    #: "le" (value must be <= limit) or "ge"
    sense: str
    detail: str = ""
    #: a 90 % confidence interval of ``value``, where the figure is noisy enough to need one
    interval: tuple[float, float] | None = None

    @property
    def ok(self) -> bool:
        """Met by the measured value (see :attr:`shown` for whether the noise allows a call)."""
        return self._meets(self.value)

    @property
    def shown(self) -> bool:
        """Whether the verdict holds across the whole confidence interval."""
        if self.interval is None:
            return True
        lo, hi = self.interval
        return not math.isnan(lo) and self._meets(lo) == self._meets(hi)

    @property
    def verdict(self) -> str:
        if not self.shown:
            return "not shown"
        return "yes" if self.ok else "**no**"

    def _meets(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value <= self.limit if self.sense == "le" else value >= self.limit

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "sense": self.sense,
            "ok": self.ok,
            "shown": self.shown,
            "interval": None if self.interval is None else list(self.interval),
            "detail": self.detail,
        }


#: a set's p50 against Freak's, per loop mode (GIL-holding: at most 0.4x)
SET_VS_FREAK = {"hold": 0.4, "sleep": 2.5, "release": 2.5}
#: a set's p50 in the sleep and GIL-releasing loops (ms)
SET_MS = 1.2
#: GIL-holding loop: from sending a set until the program's loop sees it (ms)
LAND_MS = 3.0
#: a program with two busy threads of its own keeps this share of its throughput (%)
THREADS_PCT = 98.0


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def evaluate(figs: dict[str, Figure], modes: list[str], tools: list[str]) -> list[Target]:
    """The issue's targets, from figures named ``<tool>.<mode>.<what>`` and ``runctl.<what>``."""
    out: list[Target] = []

    def fig(name: str) -> Figure | None:
        return figs.get(name)

    for mode in modes:
        for what in ("get_full", "get_field"):
            f = fig(f"runctl.{mode}.{what}")
            if f is not None:
                out.append(
                    Target(f"GET {_WHAT[what]} p50, {mode} loop", f.p50 * 1e3, 1.5, "le", "ms")
                )
        if "freak" in tools:
            for what in ("get_full", "get_field"):
                r, fk = fig(f"runctl.{mode}.{what}"), fig(f"freak.{mode}.{what}")
                if mode == "hold" and r and fk:
                    out.append(
                        Target(
                            f"GET {_WHAT[what]} p50 vs Freak, hold loop",
                            ratio(r.p50, fk.p50),
                            0.2,
                            "le",
                            "x Freak",
                        )
                    )
            r, fk = fig(f"runctl.{mode}.set"), fig(f"freak.{mode}.set")
            if r and fk:
                out.append(
                    Target(
                        f"set p50 vs Freak, {mode} loop",
                        ratio(r.p50, fk.p50),
                        SET_VS_FREAK[mode],
                        "le",
                        "x Freak",
                    )
                )
        if mode != "hold" and (f := fig(f"runctl.{mode}.set")) is not None:
            out.append(Target(f"set p50, {mode} loop", f.p50 * 1e3, SET_MS, "le", "ms"))
        if mode == "hold" and (f := fig(f"runctl.{mode}.land")) is not None:
            out.append(
                Target("set sent -> loop sees it p50, hold loop", f.p50 * 1e3, LAND_MS, "le", "ms")
            )
        if (f := fig(f"runctl.{mode}.rate_100")) is not None:
            name = f"loop rate under 100 GET/s, {mode} loop"
            out.append(_percent_target(name, f, 98.0, "% of idle"))
    for key, label in (
        ("idle_ratio", "idle"),
        ("burst_ratio", "idle, starting after a quiet spell"),
        ("sets_ratio", "under 100 sets/s"),
    ):
        if (f := fig(f"runctl.threads.{key}")) is not None:
            name = f"two busy threads' throughput {label}, vs without runctl"
            out.append(_percent_target(name, f, THREADS_PCT, "%"))
    if (f := fig("runctl.rss_overhead")) is not None:
        out.append(Target("agent RSS overhead", f.p50, 30.0, "le", "MB"))
    if (f := fig("runctl.control_existing")) is not None:
        out.append(Target("control() return, existing server", f.p50 * 1e3, 200.0, "le", "ms"))
    return out


def _percent_target(name: str, f: Figure, limit: float, detail: str) -> Target:
    """A ratio that must stay at or above ``limit`` percent, judged over the confidence
    interval of its median (the noisy window figures)."""
    lo, hi = median_interval(f.pooled)
    return Target(name, f.p50 * 100, limit, "ge", detail, (lo * 100, hi * 100))


_WHAT = {"get_full": "full state", "get_field": "one field", "set": "set one field"}

#: (key, label, scale, unit) of the side-by-side rows, per mode
_ROWS = [
    ("get_full", "GET full state", 1e3, "ms"),
    ("get_field", "GET one field", 1e3, "ms"),
    ("set", "set one field", 1e3, "ms"),
    ("observe", "set answered -> loop sees it", 1e3, "ms"),
    ("land", "set sent -> loop sees it", 1e3, "ms"),
    ("rate_100", "loop rate @100 GET/s / idle", 100, "%"),
    ("rate_max", "loop rate @max GET / idle", 100, "%"),
    ("max_rps", "GET/s at max load (1 conn)", 1, "/s"),
]


def _fmt(v: float, unit: str) -> str:
    if math.isnan(v):
        return "-"
    if unit == "%" or unit == "/s" or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def _cell(f: Figure | None, scale: float, unit: str, latency: bool) -> str:
    if f is None or not f.pooled:
        return "-"
    lo, hi = f.spread
    text = f"{_fmt(f.p50 * scale, unit)} [{_fmt(lo * scale, unit)}-{_fmt(hi * scale, unit)}]"
    if latency:
        text += f" p99 {_fmt(f.p99 * scale, unit)}"
    return text


def render(
    figs: dict[str, Figure], targets: list[Target], modes: list[str], tools: list[str]
) -> str:
    """The side-by-side table (markdown, so it pastes into docs as is)."""
    lines = [
        "| figure | loop | "
        + " | ".join(_TOOL[t] for t in tools)
        + (" | runctl / Freak |" if len(tools) == 2 else " |"),
        "|---|---|" + "---|" * len(tools) + ("---|" if len(tools) == 2 else ""),
    ]
    for mode in modes:
        for key, label, scale, unit in _ROWS:
            cells = [figs.get(f"{t}.{mode}.{key}") for t in tools]
            if all(c is None for c in cells):
                continue
            latency = unit == "ms"
            row = (
                f"| {label} ({unit}) | {mode} | "
                + " | ".join(_cell(c, scale, unit, latency) for c in cells)
                + " |"
            )
            if len(tools) == 2:
                a, b = cells[1], cells[0]
                r = ratio(a.p50, b.p50) if a and b and a.pooled else math.nan
                row += " - |" if math.isnan(r) else f" {r:.2f} |"
            lines.append(row)
    lines.append("")
    lines.append("Other figures (runctl unless marked Freak):")
    lines.append("")
    lines.append("| figure | median [spread] |")
    lines.append("|---|---|")
    for key, label, scale, unit in _RUNCTL_ONLY:
        f = figs.get(key)
        if f is not None and f.pooled:
            lines.append(f"| {label} ({unit}) | {_cell(f, scale, unit, False)} |")
    lines.append("")
    lines.append("Targets:")
    lines.append("")
    lines.append("| target | measured | limit | met |")
    lines.append("|---|---|---|---|")
    for t in targets:
        sign = "<=" if t.sense == "le" else ">="
        measured = f"{t.value:.2f} {t.detail}"
        if t.interval is not None:
            measured += f" (90 % CI {t.interval[0]:.1f}-{t.interval[1]:.1f})"
        lines.append(f"| {t.name} | {measured} | {sign} {t.limit:g} | {t.verdict} |")
    return "\n".join(lines)


_TOOL = {"freak": "Freak 0.0.2", "runctl": "runctl"}
_RUNCTL_ONLY = [
    ("runctl.rss_overhead", "agent RSS overhead, after start + 1 s", 1, "MB"),
    ("runctl.rss_overhead_loaded", "agent RSS overhead, after the whole benchmark", 1, "MB"),
    ("freak.rss_overhead_loaded", "(Freak: RSS overhead after the whole benchmark)", 1, "MB"),
    ("runctl.import", "import runctl", 1e3, "ms"),
    ("runctl.control_existing", "control() returns, existing server", 1e3, "ms"),
    ("runctl.ready_existing", "control() -> agent ready, existing server", 1e3, "ms"),
    ("runctl.control_embedded", "control() returns, embedded server", 1e3, "ms"),
    ("runctl.ready_embedded", "control() -> agent ready, embedded server", 1e3, "ms"),
    ("runctl.gateway_rps4", "gateway GET/s, 4 concurrent clients", 1, "/s"),
    ("none.threads.rate", "two busy threads, runctl's agent closed: their iterations", 1, "/s"),
    ("runctl.threads.idle_ratio", "two busy threads with runctl, idle / agent closed", 100, "%"),
    ("runctl.threads.burst_ratio", "two busy threads after a quiet spell / agent closed", 100, "%"),
    ("runctl.threads.sets_ratio", "two busy threads, 100 sets/s / agent closed", 100, "%"),
    ("runctl.threads.sets_vs_idle", "two busy threads, 100 sets/s / runctl idle", 100, "%"),
    ("runctl.threads.burst_vs_idle", "two busy threads, after a quiet spell / idle", 100, "%"),
    ("runctl.threads.sets_rate", "(sets/s sent during those windows)", 1, "/s"),
    ("runctl.threads.restart", "(agent closed -> started again and ready)", 1e3, "ms"),
    ("freak.gateway_rps4", "(Freak: GET/s, 4 concurrent clients, loop paused)", 1, "/s"),
]
