"""The console driven as a person would: headless Chromium (Debian's ``chromium``, through
Playwright for Python) against a real gateway, nats-server and rank processes.

Every wait has a deadline and waits for a condition (never for a time): Playwright's
``wait_for_*`` and :func:`conftest.wait_for`.

``.ci/run`` installs chromium with apt where it is missing; elsewhere these tests skip with
a message saying what is missing.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import anyio
import httpx
import pytest
from conftest import register_silent_rank, spawn_python, wait_for
from test_console_api import has_listener

from runctl.gateway.auth import parse_env
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = os.environ.get("RUNCTL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
READ = "read-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
DEADLINE_MS = 30_000

PROGRAM = """
    import sys, time
    from typing import Literal
    from pydantic import BaseModel, Field
    from runctl import control

    class Opt(BaseModel):
        kind: Literal["sgd", "adam"] = "sgd"
        lr: float = Field(0.01, gt=0, le=1)
        decay: float | None = None

    class S(BaseModel):
        opt: Opt = Opt()
        batch: int = Field(32, ge=1)
        verbose: bool = False
        loss: float = 2.0

    state = S()
    ctl = control(state, heartbeat=0.25).wait_ready()

    @ctl.on_checkpoint
    def save(step):  # for a stop with a checkpoint first: a value to store
        print("CHECKPOINT", step, flush=True)
        return {"step": step, "loss": state.loss}

    print("READY", flush=True)
    step, seen = 0, state.opt.kind
    while not ctl.stop_requested:
        ctl.sync(step)
        with ctl.lock:
            state.loss = round(2.0 / (1 + step * 0.02), 5)
            kind = state.opt.kind
        if kind != seen:
            seen = kind
            print("KIND", kind, "at", step, flush=True)
        if step % 25 == 24:
            ctl.done("chunk", step // 25, wait=False)  # a logged step, for the timeline
        step += 1
        time.sleep(0.02)
    print("STOPPED", ctl.stop_reason, flush=True)
    ctl.close()
"""


class Rank:
    """A rank process whose output is collected as it comes (never blocks the test)."""

    def __init__(self, run: str, rank: int, url: str) -> None:
        self.rank = rank
        self.proc: subprocess.Popen[str] = spawn_python(
            textwrap.dedent(PROGRAM),
            env={"RUNCTL_RUN": run, "RUNCTL_RANK": str(rank), "RUNCTL_NATS_URL": url},
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_said(self, text: str, timeout: float = 30.0) -> None:
        try:
            wait_for(lambda: self.said(text) or self.proc.poll() is not None, timeout)
        except AssertionError:
            raise AssertionError(f"rank {self.rank} never said {text!r}: {self.output()}") from None
        assert self.said(text), f"rank {self.rank} exited: {self.output()}"

    def output(self) -> str:
        err = ""
        if self.proc.poll() is not None and self.proc.stderr and not self.proc.stderr.closed:
            err = self.proc.stderr.read()
        return "\n".join(self.lines[-30:]) + ("\n" + err[-3000:] if err else "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def _unavailable(why: str) -> NoReturn:
    if os.environ.get("RUNCTL_REQUIRE_BROWSER"):  # .ci/run: the browser tests must run
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        _unavailable("playwright is not installed: pip install -e '.[dev]'")
    if not Path(CHROMIUM).exists():
        _unavailable(
            f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does) "
            "or set RUNCTL_CHROMIUM"
        )
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def ranks(nats_url: str, run_id: str) -> Iterator[list[Rank]]:
    started = [Rank(run_id, rank, nats_url) for rank in range(2)]
    for rank in started:
        rank.wait_said("READY")
    yield started
    for rank in started:
        rank.stop()


@pytest.fixture
def console(nats_url: str) -> Iterator[Callable[..., tuple[str, httpx.Client]]]:
    """Start a gateway (with tokens or without); returns its URL and an admin HTTP client."""
    threads: list[GatewayThread] = []
    clients: list[httpx.Client] = []

    def start(tokens: str = "") -> tuple[str, httpx.Client]:
        settings = Settings(nats_url=nats_url, port=0, tokens=parse_env(tokens))
        thread = GatewayThread(settings).start()
        threads.append(thread)
        headers = {"Authorization": f"Bearer {ADMIN}"} if tokens else {}
        client = httpx.Client(base_url=thread.url, timeout=20, headers=headers)
        clients.append(client)
        return thread.url, client

    yield start
    for client in clients:
        client.close()
    for thread in threads:
        thread.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    opened.set_default_timeout(DEADLINE_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert not errors, errors  # no uncaught exception in the console's script


def open_run(page: Page, url: str, run: str, rank: str | None = None) -> None:
    page.goto(f"{url}/console/{run}" + (f"/{rank}" if rank is not None else ""))
    page.wait_for_selector("#ranks tbody tr[data-rank]")
    page.wait_for_selector("#live.on")


def state_of(http: httpx.Client, run: str, rank: str) -> dict[str, Any]:
    r = http.get(f"/runs/{run}/ranks/{rank}/get")
    assert r.status_code == 200, r.text
    value: dict[str, Any] = r.json()
    return value


# --- what it shows ----------------------------------------------------------------------------


def test_a_plot_receives_points_and_the_bridge_ends_with_the_page(
    page: Page, console: Any, ranks: list[Rank], run_id: str, nats_url: str
) -> None:
    url, _ = console()
    open_run(page, url, run_id)
    loss = page.wait_for_selector('.chart[data-field="loss"][data-points]')
    assert loss is not None and loss.query_selector("canvas") is not None
    before = int(loss.get_attribute("data-points") or 0)
    page.wait_for_function(
        "n => Number(document.querySelector('.chart[data-field=\"loss\"]').dataset.points) > n + 4",
        arg=before,
    )
    page.wait_for_selector('.chart[data-field="step_rate"][data-points]')
    assert page.query_selector('.chart[data-field="opt.lr"]') is not None
    # every rank is a series of each chart: one legend entry per rank
    legend = page.inner_text('.chart[data-field="loss"] .u-legend').lower()
    assert "rank 0" in legend and "rank 1" in legend
    rows = page.query_selector_all("#ranks tbody tr")
    assert [r.get_attribute("data-rank") for r in rows] == ["0", "1"]
    assert all(r.get_attribute("data-status") == "alive" for r in rows)

    probe = f"runctl.{run_id}.probe.evt.probe"

    def listening() -> bool:
        box: list[bool] = []
        thread = threading.Thread(
            target=lambda: box.append(anyio.run(has_listener, nats_url, probe))
        )
        thread.start()  # its own thread: Playwright's loop runs on this one
        thread.join()
        return box[0]

    assert listening()  # the page's live bridge subscribes on the gateway's connection
    page.goto("about:blank")
    wait_for(lambda: not listening(), timeout=20)


FROZEN = """
    import time
    from pydantic import BaseModel
    from runctl import control

    class S(BaseModel):
        x: int = 0

    ctl = control(S(), heartbeat=0.25).wait_ready()
    for step in range(20):
        ctl.sync(step)
        time.sleep(0.02)
    print("READY", flush=True)
    time.sleep(600)  # the program is frozen; its agent's thread still heartbeats
"""


def test_a_frozen_program_shows_stalled(
    page: Page, console: Any, nats_url: str, run_id: str
) -> None:
    proc = spawn_python(
        textwrap.dedent(FROZEN),
        env={"RUNCTL_RUN": run_id, "RUNCTL_NATS_URL": nats_url, "RUNCTL_STALL_AFTER": "1"},
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the agent's log lines share stdout
            if "READY" in line:
                break
        else:
            raise AssertionError(f"the program did not start: {proc.communicate()}")
        url, _ = console()
        open_run(page, url, run_id)
        page.wait_for_selector('#ranks tr[data-rank="0"][data-status="stalled"]')
        assert "1 stalled" in page.inner_text("#run-summary")
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_the_overview_lists_runs_with_filters(
    page: Page, console: Any, ranks: list[Rank], run_id: str
) -> None:
    url, _ = console()
    page.goto(url + "/")
    card = page.wait_for_selector(f'section.run[data-run="{run_id}"]')
    assert card is not None and "2 alive" in card.inner_text()
    page.fill("#filter", "no-such-run-anywhere")
    page.wait_for_selector(f'section.run[data-run="{run_id}"]', state="detached")
    page.fill("#filter", run_id)
    page.wait_for_selector(f'section.run[data-run="{run_id}"]')
    page.click(f'section.run[data-run="{run_id}"] a[href="/console/{run_id}/1"]')
    page.wait_for_selector("#state")
    assert page.url.endswith(f"/console/{run_id}/1")
    page.wait_for_function("() => document.querySelector('#state').textContent.includes('kind')")


# --- what it changes --------------------------------------------------------------------------


def test_changing_a_literal_with_its_select_reaches_the_program(
    page: Page, console: Any, ranks: list[Rank], run_id: str
) -> None:
    url, http = console()
    open_run(page, url, run_id)
    options = page.eval_on_selector_all(
        'select[name="opt.kind"] option', "os => os.map(o => o.text)"
    )
    assert options == ["sgd", "adam"]
    assert page.input_value('input[name="opt.lr"]') == "0.01"
    assert page.is_checked('input[name="opt.decay.none"]')  # Optional: none
    page.select_option('select[name="opt.kind"]', label="adam")
    page.click("#edit-apply")
    page.wait_for_selector('#edit-result li[data-rank="1"].ok')
    for rank in ranks:
        rank.wait_said("KIND adam")  # the program itself sees the new value
    assert state_of(http, run_id, "0")["opt"]["kind"] == "adam"
    assert page.query_selector_all("#edit-result li.ok") and not page.query_selector(
        ".field.invalid"
    )


def test_a_change_at_the_same_step_on_every_rank(
    page: Page, console: Any, ranks: list[Rank], run_id: str
) -> None:
    url, _ = console()
    open_run(page, url, run_id)
    page.select_option('select[name="opt.kind"]', label="adam")
    page.check("#edit-sync")
    page.click("#edit-apply")
    scheduled = page.wait_for_selector("#edit-result :text('Scheduled for step')")
    assert scheduled is not None
    at = int(scheduled.inner_text().split("step ")[1].split(" ")[0])
    for rank in ranks:
        rank.wait_said(f"KIND adam at {at}")  # every rank applied it at that very step


def test_an_invalid_number_shows_pydantic_at_the_field_and_changes_nothing(
    page: Page, console: Any, ranks: list[Rank], run_id: str
) -> None:
    url, http = console()
    open_run(page, url, run_id)
    before = state_of(http, run_id, "0")["opt"]
    page.select_option("#edit-target", "0")
    page.fill('input[name="opt.lr"]', "-1")
    page.click("#edit-apply")
    err = page.wait_for_selector('[data-error-for="opt.lr"]:not(:empty)')
    assert err is not None and "greater than 0" in err.inner_text()
    assert page.query_selector('.field.invalid[data-path="opt.lr"]') is not None
    page.fill('input[name="opt.lr"]', "fast")
    page.fill('input[name="batch"]', "0")
    page.click("#edit-apply")
    page.wait_for_function(
        "() => document.querySelector('[data-error-for=\"opt.lr\"]').textContent"
        ".includes('valid number')"
    )
    batch = page.inner_text('[data-error-for="batch"]')
    assert "greater than or equal to 1" in batch
    # one patch, all or nothing: neither field changed, nor the one typed correctly with them
    assert state_of(http, run_id, "0")["opt"] == before
    assert state_of(http, run_id, "0")["batch"] == 32
    assert not any(rank.said("KIND") for rank in ranks)


def test_stop_all_shows_every_acknowledgement_and_the_programs_exit(
    page: Page, console: Any, ranks: list[Rank], run_id: str
) -> None:
    url, _ = console()
    open_run(page, url, run_id)
    page.fill("#stop-reason", "enough from the console")
    page.click("#stop-button")
    page.wait_for_selector("#stop-button.armed")  # a second click confirms
    page.click("#stop-button")
    for rank in ("0", "1"):
        page.wait_for_selector(
            f'#stop-acks li[data-rank="{rank}"][data-state="ok"], '
            f'#stop-acks li[data-rank="{rank}"][data-state="exited"]'
        )
    page.wait_for_selector("#stop-result :text('every rank acknowledged')")
    for program in ranks:
        program.wait_said("STOPPED enough from the console")
        wait_for(lambda p=program: p.proc.poll() is not None, timeout=30)
        assert program.proc.returncode == 0, program.output()
    # the page follows them to the end: each rank shows exited
    for rank in ("0", "1"):
        page.wait_for_selector(f'#stop-acks li[data-rank="{rank}"][data-state="exited"]')
        page.wait_for_selector(f'#ranks tr[data-rank="{rank}"][data-status="exited"]')


def test_a_stop_with_a_checkpoint_first_lists_what_each_rank_stored(
    page: Page, console: Any, ranks: list[Rank], run_id: str
) -> None:
    url, _ = console()
    open_run(page, url, run_id)
    page.check("#stop-checkpoint")
    page.click("#stop-button")
    page.wait_for_selector("#stop-button.armed")
    page.click("#stop-button")
    for program in ranks:
        program.wait_said("STOPPED")
    steps = set()
    for program in ranks:
        (line,) = [x for x in program.output().splitlines() if x.startswith("CHECKPOINT")]
        steps.add(int(line.split()[1]))
    (step,) = steps  # every rank at the same step
    for rank in ("0", "1"):
        item = page.wait_for_selector(f'#stop-checkpoints li[data-checkpoint-rank="{rank}"]')
        assert item is not None
        assert f"checkpoint at step {step} stored" in item.inner_text(), item.inner_text()
    # one rank chosen: a checkpoint stop is run-wide only, so the box is not offered
    page.select_option("#stop-target", "0")
    assert not page.is_visible("#stop-checkpoint")


def test_forgetting_a_step_from_the_timeline(
    page: Page, console: Any, ranks: list[Rank], run_id: str
) -> None:
    url, http = console()

    def logged() -> set[tuple[str, str]]:
        rows = http.get(f"/runs/{run_id}/steps").json()["steps"]
        return {(s["rank"], s["step"]) for s in rows}

    wait_for(lambda: {("0", "chunk[0]"), ("0", "chunk[1]")} <= logged(), timeout=30)
    open_run(page, url, run_id)
    page.wait_for_selector("#steps-timeline .bar.done")
    row = page.wait_for_selector('#steps tr[data-step="chunk[0]"][data-rank="0"]')
    assert row is not None
    forget = row.query_selector("button:text-is('forget')")
    assert forget is not None
    forget.click()
    page.wait_for_selector('#steps tr[data-step="chunk[0]"][data-rank="0"] button.armed')
    forget.click()  # the second click confirms
    page.wait_for_selector("#notice:has-text('forgot chunk[0]')")
    wait_for(lambda: ("0", "chunk[0]") not in logged(), timeout=20)
    assert ("0", "chunk[1]") in logged()  # that step only


def test_stop_names_the_ranks_that_do_not_answer(
    page: Page, console: Any, ranks: list[Rank], run_id: str, nats_url: str
) -> None:
    # a rank the registry knows alive whose program never answers (frozen, cut off)
    registering = threading.Thread(
        target=anyio.run, args=(register_silent_rank, nats_url, run_id, "7")
    )
    registering.start()  # its own thread: Playwright's loop runs on this one
    registering.join()
    url, _ = console()
    open_run(page, url, run_id)
    page.wait_for_selector('#ranks tr[data-rank="7"]')
    page.click("#stop-button")
    page.wait_for_selector("#stop-button.armed")
    page.click("#stop-button")
    page.wait_for_selector('#stop-acks li[data-rank="7"][data-state="none"]')
    for rank in ("0", "1"):
        page.wait_for_selector(
            f'#stop-acks li[data-rank="{rank}"][data-state="ok"], '
            f'#stop-acks li[data-rank="{rank}"][data-state="exited"]'
        )
    page.wait_for_selector("#stop-result:has-text('no answer from rank(s) 7')")
    for program in ranks:
        program.wait_said("STOPPED")


# --- who may do what --------------------------------------------------------------------------


def test_a_read_only_token_sees_no_forms(
    page: Page, console: Any, ranks: list[Rank], run_id: str
) -> None:
    url, _ = console(tokens=f"read:{READ},admin:{ADMIN}")
    page.goto(f"{url}/console/{run_id}")
    page.wait_for_selector("text=This gateway needs a bearer token")
    page.fill("#token", READ)
    page.press("#token", "Enter")
    page.wait_for_selector("#ranks tbody tr[data-rank]")
    page.wait_for_selector('.chart[data-field="loss"][data-points]')  # it still sees the curves
    assert page.inner_text("#role") == "role: read"
    assert page.query_selector("#edit") is None and page.query_selector("#stop-card") is None
    assert page.query_selector("button.danger") is None
    # the token lives in this tab's sessionStorage only: no cookie, no localStorage
    assert page.evaluate("sessionStorage.getItem('runctl-token')") == READ
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
    # the same page with an admin token has the forms: the test above can fail
    page.fill("#token", ADMIN)
    page.press("#token", "Enter")
    page.wait_for_selector("#edit")
    page.wait_for_selector("#stop-card")
    assert page.inner_text("#role") == "role: admin"


HOSTILE = """<!doctype html><html><body><h1>cute cats</h1><script>
async function attack(gateway, run) {
  const tries = {};
  const attempt = async (name, url, init) => {
    try { const r = await fetch(gateway + url, init); tries[name] = r.type + ':' + r.status; }
    catch (e) { tries[name] = 'blocked'; }
  };
  tries.token = sessionStorage.getItem('runctl-token');
  await attempt('stop-simple', `/runs/${run}/ranks/all/stop?reason=pwned`,
                {method: 'POST', mode: 'no-cors', credentials: 'include'});
  await attempt('stop-text', `/runs/${run}/ranks/all/stop?reason=pwned`,
                {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'},
                 body: '{}'});
  await attempt('patch-json', `/runs/${run}/ranks/all/set`,
                {method: 'PATCH', headers: {'Content-Type': 'application/json'},
                 body: JSON.stringify({opt: {lr: 0.5}}), credentials: 'include'});
  await attempt('put', `/runs/${run}/ranks/all/set/opt.lr?value=0.5`,
                {method: 'PUT', mode: 'no-cors'});
  await attempt('read', `/runs/${run}/ranks/0/get`, {});
  const form = document.createElement('form');
  form.method = 'POST';
  form.action = gateway + `/runs/${run}/ranks/all/stop?reason=pwned`;
  form.target = 'sink';
  const sink = document.createElement('iframe');
  sink.name = 'sink';
  document.body.append(sink, form);
  const loaded = new Promise(resolve => sink.addEventListener('load', resolve));
  form.submit();
  await loaded;
  return tries;
}
</script></body></html>"""


@pytest.fixture
def hostile_site() -> Iterator[str]:
    """A page on another origin (another host name and port than the gateway's)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = HOSTILE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_page_from_another_origin_cannot_change_anything(
    page: Page, console: Any, ranks: list[Rank], run_id: str, hostile_site: str
) -> None:
    url, http = console(tokens=f"read:{READ},admin:{ADMIN}")
    # the operator has the console open, with an admin token, in the same browser
    page.goto(f"{url}/console/{run_id}")
    page.fill("#token", ADMIN)
    page.press("#token", "Enter")
    page.wait_for_selector("#stop-card")
    evil = page.context.new_page()
    evil.goto(hostile_site + "/")
    tries = evil.evaluate("([g, r]) => attack(g, r)", [url, run_id])
    assert tries["token"] is None  # another origin never sees the console's storage
    assert tries["patch-json"] == "blocked" and tries["read"] == "blocked", tries
    after = http.get(f"/runs/{run_id}").json()["ranks"]
    assert all(not r["stop_requested"] for r in after), json.dumps(tries)
    assert state_of(http, run_id, "0")["opt"]["lr"] == 0.01
    assert all(rank.proc.poll() is None and not rank.said("STOPPED") for rank in ranks)
