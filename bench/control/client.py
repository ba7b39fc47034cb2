"""The load client: a separate process speaking keep-alive HTTP/1.1 (``http.client``).

    python -m bench.control.client --shm PAGE

Reads one JSON command per line on stdin, answers one JSON line on stdout. Standard library
only, so the same code drives both tools. Operations:

- ``latency``: ``n`` sequential requests, each one's duration
- ``set``: ``n`` sequential writes of a fresh value each; per write the duration, the
  time from its response until the main loop first saw the value (0 if it saw it before
  the response arrived), and from sending it until the loop saw it
- ``window``: the loop's iteration rate over ``duration`` seconds, while sending nothing
  (``rate`` 0), a paced ``rate`` of requests per second (GETs, or PUTs of fresh values),
  or as many GETs as one connection can (``rate`` -1)
- ``throughput``: requests per second from ``concurrency`` threads, one connection each
- ``mode``: set the program's work mode; ``fetch``: one request, status and body
- ``agent``: close (``on`` false) or start again runctl's agent in the paused program
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from bench.control.shm import AGENT_OFF, AGENT_ON, Page

__all__ = ["Http", "main"]

#: a write the loop has not seen after this long counts as lost
OBSERVE_TIMEOUT = 5.0


class Http:
    """One keep-alive connection; reconnects if the server closed it."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request(method, self.prefix + path)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


class Client:
    def __init__(self, page: Page) -> None:
        self.page = page
        self.conns: dict[str, Http] = {}

    def http(self, base: str) -> Http:
        if base not in self.conns:
            self.conns[base] = Http(base)
        return self.conns[base]

    def latency(self, base: str, method: str, path: str, n: int) -> dict[str, Any]:
        conn = self.http(base)
        times: list[float] = []
        errors = 0
        for _ in range(n):
            t0 = time.perf_counter()
            status, _body = conn.request(method, path)
            times.append(time.perf_counter() - t0)
            errors += status != 200
        return {"times": times, "errors": errors}

    def set(self, base: str, path: str, n: int, first: int, gap: float = 0.0) -> dict[str, Any]:
        """``path`` holds ``{value}``; values ``first``, ``first+1``... are all new. ``gap``:
        wait a random 0-``gap`` seconds before each set, so that sets do not fall in step
        with the program's own loop (each set is otherwise sent right after the loop saw
        the previous one)."""
        conn = self.http(base)
        pause = random.Random(first)  # noqa: S311 - spacing requests, not secrets
        times: list[float] = []
        observe: list[float] = []
        land: list[float] = []
        errors = lost = 0
        for value in range(first, first + n):
            if gap:
                time.sleep(pause.uniform(0, gap))
            sent = time.monotonic()
            t0 = time.perf_counter()
            status, _body = conn.request("PUT", path.format(value=value))
            t1 = time.perf_counter()
            answered = time.monotonic()
            times.append(t1 - t0)
            if status != 200:
                errors += 1
                continue
            deadline = answered + OBSERVE_TIMEOUT
            while True:
                seen, when = self.page.seen()
                if seen == value:
                    observe.append(max(0.0, when - answered))
                    land.append(when - sent)
                    break
                if time.monotonic() > deadline:
                    lost += 1
                    break
                time.sleep(0.0002)
        return {"times": times, "observe": observe, "land": land, "errors": errors, "lost": lost}

    def window(
        self,
        base: str,
        path: str,
        rate: float,
        duration: float,
        method: str = "GET",
        first: int = 0,
    ) -> dict[str, Any]:
        """``method`` PUT: ``path`` holds ``{value}``, filled with ``first``, ``first+1``..."""
        conn = self.http(base) if rate else None
        n0, t0 = self.page.loop()
        start = time.monotonic()
        end = start + duration
        sent = errors = 0
        if rate > 0:
            assert conn is not None
            interval = 1.0 / rate
            due = start
            while (now := time.monotonic()) < end:
                if now < due:
                    time.sleep(min(due - now, end - now))
                    continue
                status, _ = conn.request(method, path.format(value=first + sent))
                sent += 1
                errors += status != 200
                due += interval
                if due < now - interval:  # fell behind: do not burst to catch up
                    due = now
        elif rate < 0:
            assert conn is not None
            while time.monotonic() < end:
                status, _ = conn.request("GET", path)
                sent += 1
                errors += status != 200
        else:
            time.sleep(duration)
        elapsed = time.monotonic() - start
        n1, t1 = self.page.loop()
        loop_rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return {
            "loop_rate": loop_rate,
            "iterations": n1 - n0,
            "requests": sent,
            "request_rate": sent / elapsed,
            "errors": errors,
        }

    def throughput(self, base: str, path: str, concurrency: int, duration: float) -> dict[str, Any]:
        counts = [0] * concurrency
        errors = [0] * concurrency
        barrier = threading.Barrier(concurrency + 1)
        stop_at: list[float] = []

        def worker(i: int) -> None:
            conn = Http(base)
            conn.request("GET", path)  # connect before the clock starts
            barrier.wait()
            while time.monotonic() < stop_at[0]:
                status, _ = conn.request("GET", path)
                counts[i] += 1
                errors[i] += status != 200
            conn.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
        for t in threads:
            t.start()
        stop_at.append(time.monotonic() + duration)
        start = time.monotonic()
        barrier.wait()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        return {"rps": sum(counts) / elapsed, "requests": sum(counts), "errors": sum(errors)}

    def fetch(self, base: str, method: str, path: str) -> dict[str, Any]:
        status, body = self.http(base).request(method, path)
        return {"status": status, "body": body.decode(errors="replace")}

    def agent(self, on: bool, timeout: float = 30.0) -> dict[str, Any]:
        """Close or start runctl's agent in the paused program; returns once it is done
        (the agent ready again), with how long that took."""
        want = AGENT_ON if on else AGENT_OFF
        self.page.set_mode("pause")
        self.page.want_agent(want)
        started = time.monotonic()
        while self.page.agent() != want:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"the program did not turn its agent {'on' if on else 'off'}")
            time.sleep(0.005)
        return {"s": time.monotonic() - started}

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.pop("op")
        if op == "mode":
            self.page.set_mode(cmd["mode"])
            return {}
        if op == "reset":  # drop connections (a tool was restarted)
            for conn in self.conns.values():
                conn.close()
            self.conns.clear()
            return {}
        result: dict[str, Any] = getattr(self, op)(**cmd)
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench load client (JSON lines on stdin)")
    parser.add_argument("--shm", required=True)
    args = parser.parse_args(argv)
    client = Client(Page(args.shm))
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        try:
            reply = {"ok": True, **client.handle(cmd)}
        except Exception as exc:  # reported to the runner, which decides
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
