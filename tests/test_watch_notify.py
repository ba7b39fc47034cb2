"""Delivering notices: a real HTTP receiver on 127.0.0.1 and real shell commands; retries
with backoff while the receiver fails, none for an answer retrying cannot fix."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from runctl.bus.errors import BadRequest
from runctl.cli.watch.notices import Notice
from runctl.cli.watch.notify import Command, Retry, Slack, Webhook, deliver, safe_url

pytestmark = pytest.mark.anyio

NOTICE = Notice("stalled", "exp1", "3", "run exp1, rank 3 stalled", {"idle_s": 70.0})
FAST = Retry(retries=3, first=0.01, most=0.05)


class Answers:
    """A receiver on 127.0.0.1 that answers with the given statuses in turn (then 200)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.bodies: list[Any] = []
        answers = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                answers.bodies.append(
                    json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                )
                status = answers.statuses.pop(0) if answers.statuses else 200
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/SECRET"


@pytest.fixture
def answers() -> Iterator[list[Answers]]:
    made: list[Answers] = []
    yield made
    for a in made:
        a.server.shutdown()
        a.server.server_close()


async def test_webhook_retries_until_the_receiver_takes_it(answers: list[Answers]) -> None:
    receiver = Answers(503, 500, 429)
    answers.append(receiver)
    outcome = await deliver(Webhook(receiver.url), NOTICE, "w@h", FAST)
    assert outcome.ok and outcome.attempts == 4
    assert [b["id"] for b in receiver.bodies] == [NOTICE.id] * 4  # the same notice each time
    body = receiver.bodies[-1]
    assert body["kind"] == "stalled" and body["watcher"] == "w@h"
    assert body["data"] == {"idle_s": 70.0} and body["rank"] == "3"


async def test_gives_up_after_its_retries_and_on_a_permanent_answer(
    answers: list[Answers],
) -> None:
    failing = Answers(503, 503, 503, 503, 503)
    answers.append(failing)
    outcome = await deliver(Webhook(failing.url), NOTICE, "w", FAST)
    assert not outcome.ok and outcome.attempts == 4 and outcome.error == "HTTP 503"
    wrong = Answers(404)
    answers.append(wrong)
    outcome = await deliver(Webhook(wrong.url), NOTICE, "w", FAST)
    assert not outcome.ok and outcome.attempts == 1  # retrying cannot fix a 404


async def test_unreachable_receiver_is_retried() -> None:
    outcome = await deliver(Webhook("http://127.0.0.1:1/x"), NOTICE, "w", FAST)
    assert not outcome.ok and outcome.attempts == 4 and "unreachable" in outcome.error


async def test_slack_body_is_text(answers: list[Answers]) -> None:
    receiver = Answers()
    answers.append(receiver)
    assert (await deliver(Slack(receiver.url), NOTICE, "w", FAST)).ok
    assert receiver.bodies == [{"text": ":warning: runctl: run exp1, rank 3 stalled"}]


async def test_command_gets_the_notice_and_is_retried_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    marker = tmp_path / "failed-once"
    # fails the first time, then records its stdin and environment
    script = (
        f"if [ ! -e {marker} ]; then touch {marker}; echo nope >&2; exit 3; fi; "
        f'cat > {out}; echo "$RUNCTL_NOTICE_KIND $RUNCTL_NOTICE_RUN $RUNCTL_NOTICE_RANK" >> {out}'
    )
    outcome = await deliver(Command(script), NOTICE, "w", FAST)
    assert outcome.ok and outcome.attempts == 2
    body, env_line = out.read_text().rsplit("}", 1)
    assert json.loads(body + "}")["summary"] == "run exp1, rank 3 stalled"
    assert env_line.strip() == "stalled exp1 3"
    failing = await deliver(Command("echo broken >&2; exit 1"), NOTICE, "w", FAST)
    assert not failing.ok and failing.error == "exit code 1: broken"


def test_urls_are_checked_and_never_shown_whole() -> None:
    url = "https://hooks.slack.com/services/T000/B000/XXXXSECRET?x=1"
    assert safe_url(url) == "https://hooks.slack.com/..."
    assert "SECRET" not in Slack(url).name
    for bad in ("file:///etc/passwd", "ftp://x/y", "hooks.slack.com/x", "http:///path"):
        with pytest.raises(BadRequest, match="http:// or https://"):
            Webhook(bad)
    with pytest.raises(BadRequest):
        Command("  ")


def test_backoff_doubles_up_to_its_cap_and_honours_retry_after() -> None:
    retry = Retry(retries=10, first=1.0, most=8.0)
    assert [retry.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert retry.delay(1, hint=5.0) == 5.0
    assert retry.delay(1, hint=500.0) == 8.0
