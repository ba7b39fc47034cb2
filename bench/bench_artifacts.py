"""Step files on the object store: MB/s both ways, and memory that stays flat (streamed).

    python -m bench artifacts            # 1 GiB (~1 min on 2 cores)
    python -m bench artifacts --quick    # 32 MiB: checks the harness end to end
    python -m bench artifacts --mib 256

Against a real nats-server (file storage, loopback), this process uploads a file into the
``RUNCTL_ARTIFACTS`` object store and downloads it back, as a rank's ``s.attach(...)`` and a
later run's ``s.files[...].download(...)`` do, sampling its own RSS every 20 ms. Side by side,
the physical reference: the same bytes copied to a local file (with fsync) and read back.

Prints a table and writes ``bench/results/artifacts-<time>.json`` with machine facts.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats

from bench._machine import cpu_model, nats_server_version, package_version
from runctl.bus.artifact_codec import object_name
from runctl.bus.artifact_store import ArtifactStore
from runctl.bus.server import NatsServer

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024
#: streamed means the process grows by a bounded amount, whatever the file's size
RSS_TARGET_MIB = 64.0
T = TypeVar("T")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MIB


class RssSampler:
    """Peak RSS of this process while a block runs (a thread samples every 20 ms)."""

    def __init__(self) -> None:
        self.base = 0.0
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mib())

    def __enter__(self) -> RssSampler:
        self.base = self.peak = _rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())

    @property
    def growth(self) -> float:
        return self.peak - self.base


def _make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(8 * MIB)
    with path.open("wb") as f:
        written = 0
        while written < size:
            part = block[: min(len(block), size - written)]
            f.write(part)
            digest.update(part)
            written += len(part)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _local_copy(source: Path, target: Path) -> None:
    with source.open("rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 8 * MIB)
        dst.flush()
        os.fsync(dst.fileno())


def _local_read(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(8 * MIB):
            pass


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    with RssSampler() as rss:
        started = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - started
    return elapsed, rss.growth


async def _timed_async(fn: Callable[[], Awaitable[T]]) -> tuple[float, float, T]:
    with RssSampler() as rss:
        started = time.perf_counter()
        result = await fn()
        elapsed = time.perf_counter() - started
    return elapsed, rss.growth, result


async def _measure(url: str, source: Path, work: Path) -> dict[str, Any]:
    nc = await nats.connect(url, max_reconnect_attempts=0)
    try:
        store = await ArtifactStore.open(nc.jetstream())
        name = object_name("bench", "0", "ckpt", "0-0", 1, "files/model.bin")
        up_s, up_rss, ref = await _timed_async(lambda: store.put_file(name, source))
        target = work / "downloaded.bin"
        down_s, down_rss, _ = await _timed_async(lambda: store.download(ref, target))
        return {
            "upload_s": up_s,
            "upload_rss_growth_mib": up_rss,
            "download_s": down_s,
            "download_rss_growth_mib": down_rss,
            "verified": _sha256(target) == _sha256(source),
        }
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench artifacts")
    parser.add_argument("--quick", action="store_true", help="32 MiB instead of 1 GiB")
    parser.add_argument("--mib", type=int, help="file size in MiB (default 1024)")
    args = parser.parse_args(argv)
    mib = args.mib or (32 if args.quick else 1024)
    size = mib * MIB

    with tempfile.TemporaryDirectory(prefix="runctl-bench-artifacts-") as tmp:
        work = Path(tmp)
        source = work / "model.bin"
        _make_file(source, size)
        local_write_s, local_write_rss = _timed(lambda: _local_copy(source, work / "copy.bin"))
        local_read_s, _ = _timed(lambda: _local_read(work / "copy.bin"))
        (work / "copy.bin").unlink()
        with NatsServer(store_dir=work / "nats") as server:
            store = asyncio.run(_measure(server.url, source, work))

    rows = [
        ("local file: write + fsync", size / MIB / local_write_s, local_write_rss),
        ("local file: read (page cache)", size / MIB / local_read_s, 0.0),
        (
            "object store: upload (put_file)",
            size / MIB / store["upload_s"],
            store["upload_rss_growth_mib"],
        ),
        (
            "object store: download (verified)",
            size / MIB / store["download_s"],
            store["download_rss_growth_mib"],
        ),
    ]
    print(f"\n{mib} MiB file, real nats-server on loopback (file storage)\n")
    print(f"| {'what':<36} | {'MB/s':>8} | {'RSS growth (MiB)':>16} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 18}|")
    for what, rate, rss in rows:
        print(f"| {what:<36} | {rate:8.0f} | {rss:16.1f} |")
    flat = max(store["upload_rss_growth_mib"], store["download_rss_growth_mib"]) <= RSS_TARGET_MIB
    print(
        f"\nstreamed (RSS growth <= {RSS_TARGET_MIB:.0f} MiB both ways): "
        f"{'met' if flat else 'MISSED'}; digest verified: {store['verified']}"
    )
    up_ratio = local_write_s / store["upload_s"]
    down_ratio = local_read_s / store["download_s"]
    print(
        f"object store / local: upload {up_ratio:.2f}x, "
        f"download {down_ratio:.2f}x of the local rate"
    )

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"artifacts-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "size_mib": mib,
                "local_write_s": local_write_s,
                "local_read_s": local_read_s,
                **store,
                "rss_target_mib": RSS_TARGET_MIB,
                "streamed": flat,
                "machine": {
                    "cpu": cpu_model(),
                    "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "nats_server": nats_server_version(),
                    "nats_py": package_version("nats-py"),
                },
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0 if store["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
