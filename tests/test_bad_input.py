"""Bad input everywhere it can enter: every route of the gateway, the agent's command subjects,
the client API and the CLI.

Run ids, ranks, step names and paths with ``.``, ``*``, ``>``, spaces, unicode, invalid UTF-8,
10 KB length; bodies of 10 MB, 100k-deep nesting, invalid UTF-8. Each gets a clear 4xx (or
a ``bad_request``/``too_large`` reply on the bus, exit code 2 from the CLI), nothing is
echoed back at size, the controlled program's state is untouched, and a spy subscribed to
every subject (``>``) sees no subject built from an unchecked token.

Patches themselves (apply completely or not at all) are property-tested in
tests/test_state_properties.py.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import msgspec
import nats
import pytest
from faultkit import figures
from nats.aio.msg import Msg
from pydantic import BaseModel, Field

from runctl.agent import Control, control
from runctl.bus import messages as m
from runctl.bus.client import Client
from runctl.bus.errors import BadPath, BadRequest, BadToken, PayloadTooLarge
from runctl.bus.subjects import command_subject
from runctl.cli.app import main as cli
from runctl.gateway.app import create_app
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)


class Cfg(BaseModel):
    epochs: int = 3
    name: str = "x"
    opt: Opt = Opt()
    tags: dict[str, int] = {}


TEN_KB = "x" * 10_000
#: every kind of name that must never become a subject token; sent percent-encoded, so
#: the gateway receives exactly these (invalid UTF-8 as lone surrogates: bytes FF FE)
BAD_NAMES = [
    ".",
    "a.b",
    "*",
    "a*",
    ">",
    "a>",
    " ",
    "a b",
    "caf\u00e9",
    "\u65e5\u672c",
    "\U0001f600",
    "\udcff\udcfe",
    "a\x00b",
    "a/b",
    "-" * 129,
    TEN_KB,
    "..",
    "a.*.>",
    "",
]
DEEP = 100_000
#: a subject's tokens: clean, or a whole-token wildcard; $JS/$KV/_INBOX prefixes
_TOKEN = re.compile(r"\$?[A-Za-z0-9_-]+|\*|>")
_KINDS = {"cmd", "state", "evt", "done", "journal", "*", ">"}


def clean_subject(subject: str, runs: set[str]) -> bool:
    """True if ``subject`` was built only from checked tokens of the runs we used."""
    tokens = subject.split(".")
    if not all(_TOKEN.fullmatch(t) for t in tokens):
        return False
    for i, part in enumerate(tokens):
        if part == "runctl" and i + 1 < len(tokens):  # also inside $JS API subjects
            if tokens[i + 1] not in runs | {"*", ">"}:
                return False
            if i + 3 < len(tokens) and tokens[i + 3] not in _KINDS:
                return False
    if subject.startswith("$KV.RUNCTL_RANKS.") and len(tokens) > 2:
        return tokens[2] in runs | {"*", ">"}
    return True


def encoded(text: str) -> str:
    """Every byte but letters and digits percent-encoded (``.`` too: a client would
    otherwise drop a ``.`` or ``..`` path segment before sending)."""
    data = text.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if chr(b).isalnum() and b < 128 else f"%{b:02X}" for b in data)


def small_and_not_echoed(body: bytes, bad: str | bytes) -> bool:
    """The answer is short (at most 50 errors are listed), and never repeats more than 300
    bytes of the input."""
    raw = bad.encode(errors="surrogateescape") if isinstance(bad, str) else bad
    return len(body) < 16_000 and (len(raw) <= 300 or raw[:300] not in body)


@pytest.fixture
def agent(nats_url: str, run_id: str) -> Iterator[Control[Cfg]]:
    with control(Cfg(), run=run_id, rank=0, url=nats_url) as ctl:
        yield ctl.wait_ready()


@pytest.fixture
def gateway_url(nats_url: str, run_id: str) -> Iterator[str]:
    # refusing 60k bad keys takes the agent ~0.3 s on an idle core; the 2 s default is
    # too tight on a loaded test machine, and latency is not what this file tests
    settings = Settings(nats_url=nats_url, port=0, default_run=run_id, timeout=10)
    with GatewayThread(settings) as gw:
        yield gw.url


@pytest.fixture
async def subjects(nats_url: str) -> AsyncIterator[list[str]]:
    """Every subject published on the server while the test runs (JetStream API included)."""
    seen: list[str] = []
    nc = await nats.connect(nats_url)

    async def record(msg: Msg) -> None:
        seen.append(msg.subject)

    await nc.subscribe(">", cb=record)
    await nc.flush()
    yield seen
    await nc.drain()


def route_requests(run: str) -> list[tuple[str, str, dict[str, str], set[str]]]:
    """(method, path template, query, the parameters that carry a name) for every route of
    the gateway's OpenAPI: each of those parameters gets every bad name in turn."""
    spec = create_app(Settings()).openapi()
    out = []
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            names = {p["name"] for p in op.get("parameters", [])}
            query: dict[str, str] = {}
            if "value" in names:
                query["value"] = "1"
            if "path" in names and "{path}" not in path:
                query["path"] = "epochs"
            if "explain" in names:
                query["explain"] = "true"  # ?config= is read only with it
            carriers = names & {"run", "rank", "path", "step", "name", "value", "config"}
            if path.endswith("/steps") and method == "get":
                carriers.add("rank")  # the steps log's ?rank= filter
            if path.endswith("/history") and method == "get":
                # a filter over stored paths, never a subject nor a field lookup: "a.b" or
                # "café" simply match nothing (a malformed one is 400: test_journal_surfaces)
                carriers.discard("path")
            if carriers:
                out.append((method.upper(), path, query, carriers))
    # the steps routes' token filters, which the generic pass above sends in the query
    assert any(p.endswith("/steps") for _, p, _, _ in out)
    return out


def fill(path: str, run: str, override: dict[str, str]) -> str:
    values = {"run": run, "rank": "0", "path": "epochs", "step": "item", **override}
    for key, value in values.items():
        path = path.replace("{" + key + "}", value)
    return path


@pytest.mark.anyio
async def test_bad_names_on_every_route_are_4xx_and_never_become_subjects(
    agent: Control[Cfg], gateway_url: str, subjects: list[str], run_id: str
) -> None:
    tried = 0
    statuses: Counter[int] = Counter()
    async with httpx.AsyncClient(base_url=gateway_url, timeout=20) as http:
        for method, template, query, carriers in route_requests(run_id):
            for param in sorted(carriers):
                for bad in BAD_NAMES:
                    if (bad == "" and "{" + param + "}" in template) or (
                        param == "path" and bad in ("", ".")
                    ):
                        # an empty path segment is another route (Starlette redirects
                        # /runs/ to /runs); "" and "." are the root path: the whole state
                        continue
                    raw = f"{bad}=1" if param == "config" else bad
                    if "{" + param + "}" in template:
                        url = fill(template, run_id, {param: encoded(raw)})
                        extra = ""
                    else:
                        url = fill(template, run_id, {})
                        extra = f"{param}={encoded(raw)}"
                    query_text = "&".join(
                        [f"{k}={encoded(v)}" for k, v in query.items() if k != param]
                        + ([extra] if extra else [])
                    )
                    target = f"{url}?{query_text}" if query_text else url
                    body = {"epochs": 5} if method == "PATCH" else None
                    response = await http.request(method, target, json=body)
                    tried += 1
                    statuses[response.status_code] += 1
                    what = (
                        method,
                        template,
                        param,
                        bad[:20],
                        response.status_code,
                        response.text[:200],
                    )
                    assert 400 <= response.status_code < 500, what
                    assert small_and_not_echoed(response.content, bad), what
    await anyio.sleep(0.2)  # let the spy see anything still in flight
    assert agent.version == 0 and agent.state == Cfg() and not agent.stop_requested
    dirty = [s for s in subjects if not clean_subject(s, {run_id})]
    assert not dirty, dirty[:5]
    assert tried > 500
    figures(
        "bad_names_http",
        inputs=tried,
        statuses=dict(statuses),
        subjects_checked=len(subjects),
        dirty_subjects=0,
        state_changed=False,
    )


def bodies() -> list[tuple[str, bytes]]:
    deep_list = b"[" * DEEP + b"]" * DEEP
    deep_object = b'{"a":' * DEEP + b"1" + b"}" * DEEP
    return [
        ("10 MB", b'{"name": "' + b"z" * (10 << 20) + b'"}'),
        ("100k-deep list", b'{"tags": ' + deep_list + b"}"),
        ("100k-deep object", b'{"tags": ' + deep_object + b"}"),
        ("100k-deep at root", deep_object),
        ("1k-deep", b'{"tags": ' + b'{"a":' * 1000 + b"1" + b"}" * 1001),
        ("invalid UTF-8 in a string", b'{"name": "\xff\xfe\xc3\x28"}'),
        ("invalid UTF-8 in a key", b'{"\xc3\x28": 1}'),
        ("invalid UTF-8, bare", b"\xff" * 1000),
        ("NUL bytes", b"\x00" * 1000),
        ("not JSON", b"{" + b"q" * 500_000),
        ("a JSON array", b"[1, 2]"),
        ("a JSON string", b'"' + TEN_KB.encode() + b'"'),
        ("empty", b""),
        ("NaN", b'{"opt": {"lr": NaN}}'),
        ("huge number", b'{"epochs": 1' + b"0" * 5000 + b"}"),
        ("duplicate keys", b'{"epochs": 1, "epochs": "x"}'),
        ("unknown field at size", b'{"' + TEN_KB.encode() + b'": 1}'),
        ("60k unknown fields", msgspec.json.encode({f"k{i}": 1 for i in range(60_000)})),
        (
            "60k invalid values",
            msgspec.json.encode({"tags": {f"k{i}": "x" for i in range(60_000)}}),
        ),
    ]


@pytest.mark.anyio
async def test_bad_bodies_are_4xx_not_echoed_and_change_nothing(
    agent: Control[Cfg], gateway_url: str, run_id: str
) -> None:
    tried = 0
    statuses: Counter[int] = Counter()
    targets = [
        f"/runs/{run_id}/ranks/0/set",
        f"/runs/{run_id}/ranks/all/set",
        f"/runs/{run_id}/ranks/0/set/opt",
        "/set",
        "/set/opt",
    ]
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as http:
        for name, body in bodies():
            # the costly ones (10 MB, 60k errors) on one rank and on all; the rest everywhere
            for url in targets[:2] if len(body) > 100_000 else targets:
                response = await http.patch(url, content=body)
                tried += 1
                statuses[response.status_code] += 1
                what = (name, url, response.status_code, response.text[:200])
                assert 400 <= response.status_code < 500, what
                assert small_and_not_echoed(response.content, body), what
        # deep nesting and invalid UTF-8 where a value comes in the query, too
        # (as deep as fits in a URL: httpx refuses over 64 KiB)
        for value in [
            "[" * 10_000 + "]" * 10_000,
            '{"a":' * 3000 + "1" + "}" * 3000,
            "\udcff\udcfe",
            TEN_KB,
        ]:
            for url in (f"/runs/{run_id}/ranks/0/set/tags", "/set/tags"):
                response = await http.put(f"{url}?value={encoded(value)}")
                tried += 1
                statuses[response.status_code] += 1
                assert 400 <= response.status_code < 500, (url, response.text[:200])
                assert small_and_not_echoed(response.content, value)
        assert (await http.get(f"/runs/{run_id}/ranks/0/get")).status_code == 200
    assert agent.version == 0 and agent.state == Cfg()
    figures("bad_bodies_http", inputs=tried, statuses=dict(statuses), state_changed=False)


@pytest.mark.anyio
async def test_bad_commands_on_the_bus_get_an_error_reply_and_change_nothing(
    agent: Control[Cfg], nats_url: str, run_id: str
) -> None:
    """Any NATS client can reach an agent: what it sends is checked like HTTP input."""
    payloads = [body for _, body in bodies() if len(body) < (1 << 20)] + [
        b'{"t":"set/1","path":"tags","value":' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"t":"set/1","path":"name","value":"\xff\xc3\x28"}',
        b'{"t":"get/1","path":"' + TEN_KB.encode() + b'"}',
        b'{"t":"set/1","path":"a.*.>","value":1}',
        b'{"t":"set/1","path":"__class__","value":1}',
        b'{"t":"set/1","path":"opt.__dict__","value":{}}',
        b'{"t":"get/1"}',  # a get's tag on the set subject
        b'{"t":"set/9","path":"epochs","value":1}',
        b'{"t":"set/1","path":"epochs","value":"' + b"9" * 500_000 + b'x"}',
        b"\x00\xff" * 1000,
    ]  # over the agent's 1 MiB limit: tests/test_freak_regressions.py (a bigger server)
    codes: Counter[str] = Counter()
    nc = await nats.connect(nats_url, max_reconnect_attempts=0)
    try:
        for payload in payloads:
            for verb in ("set", "patch", "get", "reset", "stop"):
                if verb in ("reset", "stop") and payload.strip() == b"":
                    continue  # an empty reset/stop is the verb's defaults: valid on purpose
                reply = await nc.request(command_subject(run_id, 0, verb), payload, timeout=10)
                assert small_and_not_echoed(reply.data, payload), reply.data[:200]
                decoded = m.decode_reply(reply.data)
                if verb == "get" and isinstance(decoded, m.Ok):
                    continue  # e.g. b"" is a plain get
                assert isinstance(decoded, m.Err), (verb, payload[:60], decoded)
                codes[decoded.code] += 1
    finally:
        await nc.close()
    assert agent.version == 0 and agent.state == Cfg() and not agent.stop_requested
    assert set(codes) <= {
        "bad_request",
        "bad_path",
        "unknown_path",
        "not_an_object",
        "too_large",
        "validation",
    }, codes
    figures("bad_commands_nats", inputs=sum(codes.values()), codes=dict(codes), state_changed=False)


@pytest.mark.anyio
async def test_the_client_api_refuses_bad_names_before_sending(
    nats_url: str, subjects: list[str]
) -> None:
    tried = 0
    async with await Client.connect(nats_url) as client:
        for bad in BAD_NAMES:
            calls = [
                client.get(bad, 0),
                client.get("ok", bad),
                client.get(bad, 0, fresh=True),
                client.set(bad, 0, "epochs", 1),
                client.set("ok", bad, "epochs", 1),
                client.patch(bad, "all", {"epochs": 1}),
                client.reset(bad, 0),
                client.stop(bad, "all"),
                client.schema(bad, 0),
                client.ranks(bad),
                client.rank("ok", bad),
                client.ping(bad, 0),
            ]
            for call in calls:
                with pytest.raises((BadToken, BadRequest, BadPath)):
                    await call
                tried += 1
        with pytest.raises(PayloadTooLarge):
            await client.set("ok", 0, "name", "z" * (2 << 20))
    await anyio.sleep(0.2)
    assert not [s for s in subjects if s.startswith("runctl.")], subjects[:5]
    figures("bad_names_client", inputs=tried, sent=0)


def run_cli(argv: list[str]) -> int:
    """``runctl ARGV``'s exit code (argparse exits by itself for what it refuses, e.g. a
    name that starts with ``-``)."""
    try:
        return cli(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_the_cli_names_the_problem_with_exit_code_2(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tried = 0
    for bad in BAD_NAMES:
        if bad == "a/b":
            continue  # RUN/RANK is the CLI's own syntax: run a, rank b
        for argv in (
            ["get", bad],
            ["get", f"{bad}/0"],
            ["get", f"ok/{bad}"],
            ["set", f"ok/{bad}", "epochs=1"],
            ["stop", bad],
            ["steps", bad],
            ["forget", "ok", bad],
        ):
            assert run_cli(["--nats", nats_url, *argv]) == 2, argv
            err = capsys.readouterr().err
            # one line naming the problem (argparse's usage line comes before its own)
            assert err.splitlines()[-1].startswith("runctl"), err
            assert len(err) < 1000 and "Traceback" not in err
            tried += 1
    for argv in (
        ["patch", "ok/0", "[" * DEEP],
        ["patch", "ok/0", "\udcff"],
        ["set", "ok/0", "epochs=" + "[" * DEEP],
    ):
        assert run_cli(["--nats", nats_url, *argv]) == 2, argv[:2]
        err = capsys.readouterr().err
        assert err.startswith("runctl: ") and len(err) < 1000
        tried += 1
    figures("bad_names_cli", inputs=tried)
