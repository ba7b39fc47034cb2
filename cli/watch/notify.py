"""Where notices go: a generic webhook (a JSON POST per notice), a Slack-compatible
incoming webhook (``{"text": ...}``), a shell command (the notice as JSON on stdin and in
``RUNCTL_NOTICE_*`` variables), or standard output (``--dry-run``: what would be sent).

Delivery retries with exponential backoff (1 s, 2 s, 4 s ... capped) when the receiver
fails: a connection error, a timeout, HTTP 5xx, 408, 425 or 429 (honouring ``Retry-After``),
or a command's non-zero exit. Other 4xx answers are permanent: retrying would not help.
A URL's path and query (where Slack keeps the webhook's secret) are never logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Final, Protocol

import anyio
import structlog

from runctl.bus.errors import BadRequest
from runctl.cli.watch.notices import Notice

__all__ = [
    "Command",
    "Delivery",
    "Destination",
    "DryRun",
    "Retry",
    "Slack",
    "Webhook",
    "deliver",
    "safe_url",
]

log = structlog.get_logger()

HTTP_TIMEOUT: Final = 10.0
COMMAND_TIMEOUT: Final = 30.0
#: answers worth another try; other 4xx mean the request itself is wrong
_RETRY_STATUS: Final = frozenset({408, 425, 429})
USER_AGENT: Final = "runctl-watch"


class DeliveryFailed(Exception):
    """One attempt failed; ``retry`` says whether another attempt may succeed."""

    def __init__(self, message: str, *, retry: bool, after: float | None = None) -> None:
        super().__init__(message)
        self.retry = retry
        self.after = after


class Destination(Protocol):
    """Something that takes a notice (one attempt; raise DeliveryFailed when it did not)."""

    name: str

    async def send(self, notice: Notice, watcher: str) -> None:
        """Deliver one notice; raises on failure (the caller retries with backoff)."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Attempts after the first, and the backoff: ``first``, doubled each time, at most
    ``most`` seconds."""

    retries: int = 5
    first: float = 1.0
    most: float = 60.0

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """Seconds to wait before attempt number ``attempt + 1`` (``attempt`` >= 1)."""
        delay = min(self.first * float(2 ** (attempt - 1)), self.most)
        if hint is not None:
            delay = min(max(delay, hint), self.most)
        return delay


def safe_url(url: str) -> str:
    """``scheme://host[:port]/...``: enough to tell destinations apart in logs, without
    the path and query that may hold a secret."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/..."


def _check_url(url: str, what: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"{what} must be an http:// or https:// URL, not {safe_url(url)!r}")
    return url


class _Post:
    """A JSON POST (in a worker thread: urllib, no extra dependency)."""

    def __init__(self, url: str, what: str) -> None:
        self.url = _check_url(url, what)
        self.name = f"{what} {safe_url(url)}"

    async def post(self, body: dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False, default=str).encode()
        await anyio.to_thread.run_sync(self._post, data)

    def _post(self, data: bytes) -> None:
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked: http(s) only
            self.url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
        )
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as answer:  # noqa: S310
                answer.read(65536)
        except urllib.error.HTTPError as exc:
            exc.close()  # the answer's connection
            retry = exc.code >= 500 or exc.code in _RETRY_STATUS
            raise DeliveryFailed(
                f"HTTP {exc.code}", retry=retry, after=_retry_after(exc.headers)
            ) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DeliveryFailed(f"unreachable: {reason}", retry=True) from None


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Webhook(_Post):
    """Generic webhook: the notice as JSON (:meth:`Notice.to_json`)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, "webhook")

    async def send(self, notice: Notice, watcher: str) -> None:
        """POST the notice; raises DeliveryFailed when the receiver did not take it."""
        await self.post(notice.to_json(watcher))


_SLACK_ICONS: Final = {
    "stalled": ":warning:",
    "stale": ":warning:",
    "recovered": ":white_check_mark:",
    "exited": ":x:",
    "stopped": ":octagonal_sign:",
    "unacknowledged": ":warning:",
    "step_failed": ":x:",
    "condition": ":bell:",
    "action": ":robot_face:",
}


class Slack(_Post):
    """Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat, Discord's
    ``/slack`` endpoint): ``{"text": ...}``."""

    def __init__(self, url: str) -> None:
        super().__init__(url, "slack webhook")

    async def send(self, notice: Notice, watcher: str) -> None:
        """POST ``{"text": ...}`` with the notice's summary."""
        icon = _SLACK_ICONS.get(notice.kind, ":bell:")
        await self.post({"text": f"{icon} runctl: {notice.summary}"})


class Command:
    """A shell command per notice: the notice as JSON on stdin, and ``RUNCTL_NOTICE_KIND``,
    ``_RUN``, ``_RANK``, ``_SUMMARY``, ``_ID`` in its environment. Exit 0 means delivered."""

    def __init__(self, command: str) -> None:
        if not command.strip():
            raise BadRequest("--exec needs a command")
        self.command = command
        self.name = f"command {command.split()[0]!r}"

    async def send(self, notice: Notice, watcher: str) -> None:
        """Run the command once; raises DeliveryFailed on a non-zero exit or a timeout."""
        data = json.dumps(notice.to_json(watcher), ensure_ascii=False, default=str).encode()
        env = {
            **os.environ,
            "RUNCTL_NOTICE_KIND": notice.kind,
            "RUNCTL_NOTICE_RUN": notice.run,
            "RUNCTL_NOTICE_RANK": notice.rank or "",
            "RUNCTL_NOTICE_SUMMARY": notice.summary,
            "RUNCTL_NOTICE_ID": notice.id,
        }

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                ["/bin/sh", "-c", self.command],
                input=data,
                env=env,
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=COMMAND_TIMEOUT,
            )

        try:
            # subprocess.run in a worker thread: a command that exits without reading its
            # stdin is no error (communicate() ignores the broken pipe)
            done = await anyio.to_thread.run_sync(run)
        except subprocess.TimeoutExpired:
            raise DeliveryFailed(f"no exit after {COMMAND_TIMEOUT:g} s", retry=True) from None
        except OSError as exc:
            raise DeliveryFailed(f"cannot run: {exc}", retry=False) from None
        if done.returncode != 0:
            stderr: bytes = done.stderr or b""
            err = stderr.decode(errors="replace").strip().splitlines()
            last = f": {err[-1][:200]}" if err else ""
            raise DeliveryFailed(f"exit code {done.returncode}{last}", retry=True)


class DryRun:
    """``--dry-run``: print each notice, as JSON, and what it would be sent to."""

    def __init__(self, targets: list[str]) -> None:
        self.name = "dry run"
        self.targets = targets

    async def send(self, notice: Notice, watcher: str) -> None:
        """Print one JSON line on stdout: the notice and the destinations it would reach."""
        line = {"dry_run": True, "would_send_to": self.targets, **notice.to_json(watcher)}
        print(json.dumps(line, ensure_ascii=False, default=str), flush=True)


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of delivering one notice to one destination."""

    destination: str
    notice: Notice
    attempts: int
    ok: bool
    error: str = ""


async def deliver(destination: Destination, notice: Notice, watcher: str, retry: Retry) -> Delivery:
    """Send ``notice``, retrying with backoff; never raises (the outcome says)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            await destination.send(notice, watcher)
        except DeliveryFailed as exc:
            if not exc.retry or attempt > retry.retries:
                log.warning(
                    "notice not delivered",
                    destination=destination.name,
                    kind=notice.kind,
                    run=notice.run,
                    attempts=attempt,
                    error=str(exc),
                )
                return Delivery(destination.name, notice, attempt, False, str(exc))
            delay = retry.delay(attempt, exc.after)
            log.info(
                "notice delivery failed, retrying",
                destination=destination.name,
                kind=notice.kind,
                attempt=attempt,
                error=str(exc),
                retry_in=delay,
            )
            await anyio.sleep(delay)
            continue
        except Exception as exc:  # a bug in a destination must not stop the watcher
            log.exception("notice delivery crashed", destination=destination.name)
            return Delivery(destination.name, notice, attempt, False, repr(exc))
        log.info(
            "notice delivered",
            destination=destination.name,
            kind=notice.kind,
            run=notice.run,
            rank=notice.rank,
            attempts=attempt,
        )
        return Delivery(destination.name, notice, attempt, True)
