"""Refresh the console's screenshots in docs/img (``just screenshots``).

Starts ``runctl demo`` (its own nats-server, three ranks, the gateway) in a temporary
directory, lets it train, changes the learning rate on every rank and the optimizer of one
rank half way (so the curves show it), then photographs the console with Debian's headless
chromium through Playwright, and stops the demo.

    python docs/screenshots.py [--seconds 40] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(what: str, predicate: object, timeout: float) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: {what} did not happen within {timeout:g}s")
        time.sleep(0.2)


def _clip(page: object) -> dict[str, float]:
    """The page down to the end of its content (no empty space below a short page)."""
    height = page.evaluate("document.querySelector('main').getBoundingClientRect().bottom")  # type: ignore[attr-defined]
    return {"x": 0, "y": 0, "width": 1280, "height": min(1500.0, float(height) + 10)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="training before the shots")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="runctl-shots-") as tmp:
        log = Path(tmp) / "demo.log"
        with log.open("w") as out:
            demo = subprocess.Popen(
                [
                    *(sys.executable, "-m", "runctl", "demo", "--ranks", "3"),
                    *("--port", str(port), "--nats-port", "0", "--step-time", "0.1"),
                ],
                cwd=tmp,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait("the demo start", lambda: "Ctrl-C stops" in log.read_text(), 60)
            half = args.seconds / 2
            time.sleep(half)  # training: the curves fill
            httpx.patch(
                f"{url}/runs/demo/ranks/all/set", json={"optimizer": {"lr": 0.05}}, timeout=10
            ).raise_for_status()
            httpx.patch(
                f"{url}/runs/demo/ranks/2/set", json={"optimizer": {"kind": "adam"}}, timeout=10
            ).raise_for_status()
            time.sleep(half)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 1500})
                page.goto(url + "/")
                page.wait_for_selector('section.run[data-run="demo"] tr[data-rank]')
                page.wait_for_selector("#live.on")
                page.screenshot(path=str(OUT / "console-runs.png"), clip=_clip(page))
                page.goto(url + "/console/demo")
                page.wait_for_selector('.chart[data-field="loss"][data-points]')
                page.wait_for_selector("#steps-timeline .bar")
                page.wait_for_timeout(1500)  # one more live point on every curve
                page.screenshot(path=str(OUT / "console-run.png"))
                page.goto(url + "/console/demo/2")
                page.wait_for_selector('.chart[data-field="loss"][data-points]')
                page.wait_for_function(
                    "() => document.querySelector('#state').textContent.length > 10"
                )
                page.screenshot(path=str(OUT / "console-rank.png"))
                browser.close()
        finally:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(30)
            except subprocess.TimeoutExpired:
                demo.kill()
        failed = re.findall(r"Traceback.*", log.read_text())
        if failed:
            print(log.read_text(), file=sys.stderr)
            return 1
    for name in ("console-runs.png", "console-run.png", "console-rank.png"):
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
