"""One run of the control-path benchmark: start everything, measure, collect figures.

Both tools control the same program (``bench.control.program``), each in its own process,
both started once; the loop's work mode is switched through the shared page. Every round
measures each mode with each tool in turn (the tool order alternates between rounds), so
a ratio between the tools compares numbers taken seconds apart, on the same machine load.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench._machine import cpu_model, nats_server_version
from bench.control import freakenv
from bench.control.procs import REPO, BenchError, Gateway, Program, free_port, tail
from bench.control.report import Figure

__all__ = ["Config", "Run", "machine_info"]

FULL_PATH = "/get"
FIELD_PATH = "/get/lr"
SET_PATH = "/set/marker?value={value}"


@dataclass
class Config:
    tools: list[str] = field(default_factory=lambda: ["freak", "runctl"])
    modes: list[str] = field(default_factory=lambda: ["sleep", "release", "hold"])
    rounds: int = 3
    #: seconds per loop-rate window
    window: float = 0.5
    #: loop-rate windows under 100 GET/s per mode and tool per round (each between idle ones)
    rate_pairs: int = 6
    settle: float = 0.3
    #: sequential requests per latency figure per round
    n: int = 200
    sets: int = 100
    startup_repeats: int = 5
    startup_settle: float = 1.2
    throughput_s: float = 3.0
    #: program with two busy threads of its own, per round: runs of three runctl windows
    #: (idle, under 100 sets/s, idle after a quiet spell), each between two windows of the
    #: same process with runctl's agent closed
    threads_pairs: int = 12
    #: seconds per window of the two-busy-threads program, and the pause before each
    threads_window: float = 0.5
    threads_settle: float = 0.1
    #: seconds between starting the agent again and the window's start
    threads_restart_settle: float = 0.3
    #: seconds both programs rest before a "burst" window: longer than the agent's heartbeat
    #: and window together, so the agent has seen the program quiet when its threads start
    threads_quiet: float = 1.5
    #: niceness of every process of the run (children inherit it)
    nice: int = 0
    gateway_env: dict[str, str] = field(default_factory=dict)
    agent_env: dict[str, str] = field(default_factory=dict)
    keep: bool = False


@dataclass
class Run:
    cfg: Config
    figs: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    _marker: int = 1

    def fig(self, name: str, unit: str) -> Figure:
        if name not in self.figs:
            self.figs[name] = Figure(unit)
        return self.figs[name]

    # --- the whole run ------------------------------------------------------------------

    def execute(self) -> None:
        from runctl.bus.server import NatsServer

        cfg = self.cfg
        workdir = Path(tempfile.mkdtemp(prefix="runctl-bench-"))
        self.meta = {
            "machine": machine_info(),
            "config": _jsonable(cfg),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "workdir": str(workdir),
        }
        freak_python = freakenv.ensure() if "freak" in cfg.tools else None
        if cfg.nice:
            os.nice(cfg.nice)  # before any process of the run starts: all inherit it
        self.meta["versions"] = versions(freak_python)
        started = time.monotonic()
        server = NatsServer(store_dir=workdir / "nats", die_with_parent=True).start()
        programs: dict[str, Program] = {}
        gateway: Gateway | None = None
        try:
            run_id = f"bench-{os.getpid()}"
            if "runctl" in cfg.tools:
                gateway = Gateway(server.url, run_id, "0", workdir, cfg.gateway_env)
                programs["runctl"] = Program(
                    "runctl",
                    sys.executable,
                    workdir,
                    ["--nats", server.url, "--run", run_id, "--rank", "0"],
                    base=f"{gateway.url}/runs/{run_id}/ranks/0",
                    env=cfg.agent_env,
                ).start()
                gateway.start(probe=f"/runs/{run_id}/ranks/0{FULL_PATH}")
            if freak_python is not None:
                port = free_port()
                programs["freak"] = Program(
                    "freak",
                    freak_python,
                    workdir,
                    ["--port", str(port)],
                    base=f"http://127.0.0.1:{port}",
                ).start()
            for program in programs.values():
                self.sanity(program)
            for rnd in range(cfg.rounds):
                order = [programs[t] for t in cfg.tools]
                if rnd % 2:
                    order.reverse()
                for mode in cfg.modes:
                    for program in order:
                        self.measure(program, mode)
                for program in order:
                    self.throughput(program)
                if "runctl" in programs and cfg.threads_pairs:
                    for program in order:  # one busy program at a time
                        program.call("mode", mode="pause")
                    self.threads(programs["runctl"])
                    for program in order:
                        self.threads_set(program)
                self.meta.setdefault("loadavg_rounds", []).append(os.getloadavg())
                print(
                    f"  round {rnd + 1}/{cfg.rounds} done ({time.monotonic() - started:.0f}s, "
                    f"load average {os.getloadavg()[0]:.1f})",
                    file=sys.stderr,
                    flush=True,
                )
            for tool, program in programs.items():
                loaded = (program.rss_kb() - program.ready["rss_before_kb"]) / 1024
                self.fig(f"{tool}.rss_overhead_loaded", "MB").add_round([loaded])
                self.meta[f"{tool}_program"] = program.ready
        except BenchError:
            if gateway is not None:
                print(f"gateway log:\n{tail(gateway.log)}", file=sys.stderr)
            raise
        finally:
            for program in programs.values():
                program.stop()
            if gateway is not None:
                gateway.stop()
        try:
            if "runctl" in cfg.tools and cfg.startup_repeats:
                self.startup(server.url, workdir)
        finally:
            server.stop()
            self.meta["duration_s"] = time.monotonic() - started
            self.meta["loadavg_end"] = os.getloadavg()
            if not cfg.keep:
                shutil.rmtree(workdir, ignore_errors=True)

    # --- pieces -------------------------------------------------------------------------

    def sanity(self, p: Program) -> None:
        """Both tools answer the same routes with the same data, and a set is read back."""
        full = p.call("fetch", base=p.base, method="GET", path=FULL_PATH)
        if full["status"] != 200:
            raise BenchError(f"{p.tool}: GET {FULL_PATH} -> {full['status']} {full['body']}")
        body = json.loads(full["body"])
        state = body.get("value", body) if isinstance(body, dict) else body
        if not isinstance(state, dict) or "optimizer" not in state:
            raise BenchError(f"{p.tool}: GET {FULL_PATH} is not the state: {full['body'][:300]}")
        value = self.next_marker(1)
        put = p.call("set", base=p.base, path=SET_PATH, n=1, first=value)
        if put["errors"] or put["lost"]:
            raise BenchError(f"{p.tool}: a set was refused or never reached the loop")
        got = p.call("fetch", base=p.base, method="GET", path="/get/marker")
        if str(value) not in got["body"]:
            self.notes.append(
                f"{p.tool}: GET /get/marker right after a set answered "
                f"{got['body'][:100]!r}, expected {value}"
            )

    def next_marker(self, n: int) -> int:
        first = self._marker
        self._marker += n
        return first

    def measure(self, p: Program, mode: str) -> None:
        cfg, t = self.cfg, p.tool
        p.call("mode", mode=mode)
        time.sleep(cfg.settle)
        p.call("latency", base=p.base, method="GET", path=FULL_PATH, n=5)  # warm the path
        # idle, then (100 GET/s, idle) pairs, then as many GETs as one connection gets
        # answered, idle: each loaded window against the mean of the idle ones around it.
        # Short windows, many of them: this machine's speed drifts over seconds.
        rates = [0] + [100, 0] * cfg.rate_pairs + [-1, 0]
        windows = []
        for rate in rates:
            w = p.call("window", base=p.base, path=FULL_PATH, rate=rate, duration=cfg.window)
            self._errors(t, mode, f"window@{rate}", w)
            windows.append(w)
        loop = [w["loop_rate"] for w in windows]
        self.fig(f"{t}.{mode}.idle_rate", "it/s").add_round(loop[0::2])
        self.fig(f"{t}.{mode}.rate_100", "ratio").add_round(
            [loop[i] / ((loop[i - 1] + loop[i + 1]) / 2) for i, r in enumerate(rates) if r > 0]
        )
        self.fig(f"{t}.{mode}.rate_max", "ratio").add_round(
            [loop[-2] / ((loop[-3] + loop[-1]) / 2)]
        )
        self.fig(f"{t}.{mode}.rps_100", "/s").add_round(
            [w["request_rate"] for w, r in zip(windows, rates, strict=True) if r > 0]
        )
        self.fig(f"{t}.{mode}.max_rps", "/s").add_round([windows[-2]["request_rate"]])
        for key, path in (("get_full", FULL_PATH), ("get_field", FIELD_PATH)):
            r = p.call("latency", base=p.base, method="GET", path=path, n=cfg.n)
            self._errors(t, mode, key, r)
            self.fig(f"{t}.{mode}.{key}", "s").add_round(r["times"])
        s = p.call("set", base=p.base, path=SET_PATH, n=cfg.sets, first=self.next_marker(cfg.sets))
        self._errors(t, mode, "set", s)
        self.fig(f"{t}.{mode}.set", "s").add_round(s["times"])
        self.fig(f"{t}.{mode}.observe", "s").add_round(s["observe"])
        self.fig(f"{t}.{mode}.land", "s").add_round(s["land"])
        p.call("mode", mode="pause")

    def threads(self, p: Program) -> None:
        """A program with two busy threads of its own: its throughput with runctl, idle and
        under a paced 100 sets/s, against the same program without runctl. "Burst" windows
        are idle ones that start after a quiet spell longer than the agent's heartbeat: the
        threads start working while runctl's interval at rest is low.

        "Without runctl" is the same process with its agent closed (``ctl.close()``), and
        started again for the next runctl window: two processes of one program run up to
        15-20 % apart on this machine, in either direction, far more than the effect
        measured. Short windows alternate (closed, idle, closed, sets, closed, ...) and each
        runctl window is divided by the mean of the closed windows on either side: this
        machine's speed drifts by 15-20 % over seconds, and only neighbours a fraction of a
        second apart see the same machine. Every ratio is kept, so the target can be judged
        with its confidence interval rather than by one median."""
        cfg = self.cfg
        plan = [("idle", 0), ("sets", 100), ("burst", 0)] * cfg.threads_pairs
        off_rates: list[float] = []
        on_rates: list[tuple[str, float]] = []
        restarts: list[float] = []

        def window(agent: bool, rate: int, quiet: float = 0.0) -> float:
            turned = p.call("agent", on=agent)  # pauses the program first
            if agent:
                restarts.append(float(turned["s"]))
            # a started agent's first moments (its announcement, first heartbeat) are not
            # what the window measures; a burst's quiet spell is longer than that already
            time.sleep(quiet or (cfg.threads_restart_settle if agent else 0.0))
            p.call("mode", mode="threads")
            time.sleep(cfg.threads_settle)
            w = p.call(
                "window",
                base=p.base,
                path=SET_PATH,
                rate=rate,
                duration=cfg.threads_window,
                method="PUT",
                first=self.next_marker(int(rate * cfg.threads_window) + 10),
            )
            self._errors(p.tool, "threads", f"window@{rate}", w)
            if rate:
                self.fig("runctl.threads.sets_rate", "/s").add_round([w["request_rate"]])
            return float(w["loop_rate"])

        off_rates.append(window(False, 0))
        for key, rate in plan:
            quiet = cfg.threads_quiet if key == "burst" else 0.0
            on_rates.append((key, window(True, rate, quiet)))
            off_rates.append(window(False, 0))
        p.call("agent", on=True)
        p.call("mode", mode="pause")
        ratios: dict[str, list[float]] = {"idle": [], "sets": [], "burst": []}
        for i, (key, loop_rate) in enumerate(on_rates):
            ratios[key].append(loop_rate / ((off_rates[i] + off_rates[i + 1]) / 2))
        self.fig("none.threads.rate", "it/s").add_round(off_rates)
        self.fig("runctl.threads.restart", "s").add_round(restarts)
        for key, values in ratios.items():
            self.fig(f"runctl.threads.{key}_ratio", "ratio").add_round(values)
        # idle and loaded windows of the agent against each other
        idle = ratios["idle"]
        for key in ("sets", "burst"):
            paired = [w / i for i, w in zip(idle, ratios[key], strict=True) if i]
            self.fig(f"runctl.threads.{key}_vs_idle", "ratio").add_round(paired)

    def threads_set(self, p: Program) -> None:
        """Set latency in the program with two busy threads of its own: the tool's thread
        competes for the GIL with two threads that hold it (pure Python, checking a
        ``threading.Event`` between steps)."""
        cfg = self.cfg
        p.call("mode", mode="threads")
        time.sleep(cfg.settle + 1.0)  # a heartbeat: runctl sees the busy threads
        s = p.call(
            "set",
            base=p.base,
            path=SET_PATH,
            n=cfg.sets,
            first=self.next_marker(cfg.sets),
            gap=0.01,
        )
        self._errors(p.tool, "threads", "set", s)
        self.fig(f"{p.tool}.threads.set", "s").add_round(s["times"])
        self.fig(f"{p.tool}.threads.land", "s").add_round(s["land"])
        p.call("mode", mode="pause")

    def throughput(self, p: Program) -> None:
        r = p.call(
            "throughput", base=p.base, path=FULL_PATH, concurrency=4, duration=self.cfg.throughput_s
        )
        self._errors(p.tool, "pause", "throughput", r)
        self.fig(f"{p.tool}.gateway_rps4", "/s").add_round([r["rps"]])

    def startup(self, nats_url: str, workdir: Path) -> None:
        """Fresh processes: control() against the running server, then with its own."""
        cmd = [
            sys.executable,
            "-m",
            "bench.control.startup",
            "--settle",
            str(self.cfg.startup_settle),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.cfg.agent_env}
        for variant in ("existing", "embedded"):
            for i in range(self.cfg.startup_repeats):
                extra = (
                    ["--url", nats_url, "--run", f"bench-start-{i}"]
                    if variant == "existing"
                    else [
                        "--embedded",
                        "--port",
                        str(free_port()),
                        "--data-dir",
                        str(workdir / f"embedded-{i}"),
                    ]
                )
                out = subprocess.run(
                    [*cmd, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
                )
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                if out.returncode or not lines:
                    raise BenchError(f"startup measurement failed:\n{out.stdout}{out.stderr}")
                r = json.loads(lines[-1])
                self.fig(f"runctl.control_{variant}", "s").add_round([r["control_s"]])
                self.fig(f"runctl.ready_{variant}", "s").add_round([r["ready_s"]])
                if variant == "existing":
                    self.fig("runctl.import", "s").add_round([r["import_s"]])
                    self.fig("runctl.rss_overhead", "MB").add_round(
                        [(r["rss_settled_kb"] - r["rss_base_kb"]) / 1024]
                    )

    def _errors(self, tool: str, mode: str, what: str, reply: dict[str, Any]) -> None:
        bad = reply.get("errors", 0) + reply.get("lost", 0)
        if bad:
            self.notes.append(
                f"{tool} {mode} {what}: {reply.get('errors', 0)} non-200 "
                f"answers, {reply.get('lost', 0)} writes never seen by the loop"
            )


# --- facts about the machine and the software ----------------------------------------------


def machine_info() -> dict[str, Any]:
    free = subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "free_h": free.strip(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg_start": os.getloadavg(),
    }


def versions(freak_python: Path | None) -> dict[str, Any]:
    ours = {}
    for dist in (
        "runctl",
        "pydantic",
        "fastapi",
        "starlette",
        "uvicorn",
        "nats-py",
        "msgspec",
        "anyio",
        "structlog",
        "uvloop",
        "httptools",
    ):
        try:
            ours[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    out: dict[str, Any] = {"runctl_env": ours, "nats_server": nats_server_version()}
    if freak_python is not None:
        out["freak_env"] = freakenv.freeze(freak_python)
    return out


def _jsonable(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in vars(cfg).items()}
