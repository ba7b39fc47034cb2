"""The answers a Freak user relies on, through the root routes and the per-run routes alike:
a JSON body for PUT (the body wins over ``?value=``), 404 for a path that names nothing,
405 for a merge into a value, FastAPI's ``detail[*].loc``, typed text read by the rank in
one request, and a Swagger page per run typed from its model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from conftest import GatewayFactory
from pydantic import BaseModel, Field

from runctl.agent import Control, control
from runctl.bus import Client, Gathered
from runctl.bus.subjects import PREFIX


class Bar(BaseModel):
    foo: str = "bar"
    baz: int = 0


class State(BaseModel):
    name: str = "x"
    note: str | None = None
    n: int = 0
    lr: float = Field(0.1, gt=0)
    kind: Literal["sgd", "adam"] = "sgd"
    flag: bool = False
    tags: list[str] = []
    weights: dict[str, float] = {}
    bar: Bar = Bar()


@pytest.fixture
def ctl(nats_url: str, run_id: str) -> Iterator[Control[State]]:
    with control(State(), run=run_id, rank=0, url=nats_url) as handle:
        handle.wait_ready()
        yield handle


@pytest.fixture(params=["root", "run"])
def http(request: pytest.FixtureRequest, gateway: GatewayFactory, run_id: str) -> Any:
    """The Freak root routes (gateway started with --run), and the same through /runs."""
    if request.param == "root":
        return gateway(default_run=run_id), ""
    return gateway(), f"/runs/{run_id}/ranks/0"


def test_put_takes_a_json_body_and_the_body_wins(ctl: Control[State], http: Any) -> None:
    client, base = http
    assert client.put(f"{base}/set/tags", json=["a", "b"]).status_code == 200
    assert ctl.state.tags == ["a", "b"]
    assert client.put(f"{base}/set/weights", json={"enc": 0.5}).status_code == 200
    assert ctl.state.weights == {"enc": 0.5}
    # both: the body wins, as in Freak
    r = client.put(f"{base}/set/n", params={"value": "1"}, json=2)
    assert r.status_code == 200 and ctl.state.n == 2
    # a body is JSON, never text: a body that says it is text is refused (415, as no page of
    # another site may send one), one that claims JSON and is not is FastAPI's 422
    r = client.put(f"{base}/set/name", content=b"plain", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.put(
        f"{base}/set/name", content=b"plain", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body"
    # neither: FastAPI's "missing" for the query value
    r = client.put(f"{base}/set/n")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "value"]


def test_unknown_paths_are_404_and_merging_into_a_value_405(ctl: Control[State], http: Any) -> None:
    client, base = http
    for r in (
        client.get(f"{base}/get/nope"),
        client.get(f"{base}/get/bar/nope"),
        client.put(f"{base}/set/nope", params={"value": "1"}),
        client.put(f"{base}/set/bar/nope", json=1),
        client.patch(f"{base}/set/nope", json={"a": 1}),
    ):
        assert r.status_code == 404, (r.request.method, r.request.url, r.text)
        assert r.json()["error"] == "unknown_path" and "nope" in r.json()["message"]
    for field in ("lr", "tags", "name"):
        r = client.patch(f"{base}/set/{field}", json={"a": 1})
        assert r.status_code == 405 and r.headers["allow"] == "PUT", r.text
        assert r.json()["error"] == "not_an_object" and "set it instead" in r.json()["message"]
    assert ctl.version == 0


def test_error_details_are_located_as_fastapi_locates_them(ctl: Control[State], http: Any) -> None:
    client, base = http
    # Freak's README: PATCH /set/bar {"baz": "lol"} -> detail[0].loc == ["body", "baz"]
    r = client.patch(f"{base}/set/bar", json={"baz": "lol"})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "baz"] and err["field"] == ["bar", "baz"]
    assert err["type"] == "int_parsing" and "invalid value for bar.baz" in r.json()["message"]
    r = client.patch(f"{base}/set", json={"bar": {"baz": "lol"}})
    assert r.json()["detail"][0]["loc"] == ["body", "bar", "baz"]
    r = client.put(f"{base}/set/lr", params={"value": "-1"})
    assert r.json()["detail"][0]["loc"] == ["query", "value"]
    assert r.json()["detail"][0]["field"] == ["lr"]
    r = client.put(f"{base}/set/tags", json=["ok", 5])
    assert r.json()["detail"][0]["loc"] == ["body", 1]
    assert ctl.version == 0


@pytest.mark.parametrize(
    ("field", "typed", "stored"),
    [
        ("name", "null", "null"),  # a str field keeps the text, as Freak stored it
        ("name", "[1]", "[1]"),
        ("name", '{"a":1}', '{"a":1}'),
        ("name", "123", "123"),
        ("name", "true", "true"),
        ("name", '"quoted"', "quoted"),  # JSON a str field takes: the string inside
        ("note", "null", None),  # Optional[str]: JSON null fits, so it is None
        ("note", "[1]", "[1]"),
        ("n", "5", 5),
        ("lr", "10.", 10.0),
        ("kind", "adam", "adam"),
        ("flag", "true", True),
        ("tags", '["a"]', ["a"]),
    ],
)
def test_typed_text_is_read_by_the_rank_in_one_request(
    ctl: Control[State],
    gateway: GatewayFactory,
    nats_url: str,
    run_id: str,
    field: str,
    typed: str,
    stored: Any,
) -> None:
    client = gateway(default_run=run_id)
    with _commands(nats_url, run_id) as sent:
        r = client.put(f"/set/{field}", params={"value": typed})
        assert r.status_code == 200, r.text
        assert getattr(ctl.state, field) == stored
    assert sent() == ["set"]  # no second round trip


def test_a_value_neither_reading_fits_is_refused_with_the_json_readings_errors(
    ctl: Control[State], gateway: GatewayFactory, run_id: str
) -> None:
    client = gateway(default_run=run_id)
    r = client.put("/set/n", params={"value": "1.5"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "int_from_float"
    r = client.put("/set/kind", params={"value": "rmsprop"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "literal_error"
    assert ctl.version == 0


def test_cli_assignments_are_one_patch_read_by_the_rank(
    ctl: Control[State], nats_url: str, run_id: str
) -> None:
    from runctl.cli import main

    with _commands(nats_url, run_id) as sent:
        argv = ["--nats", nats_url, "set", run_id, "name=[1]", "n=3", "bar.foo=7", "note=null"]
        assert main(argv) == 0
    assert sent() == ["patch"]
    assert (ctl.state.name, ctl.state.n, ctl.state.bar.foo, ctl.state.note) == ("[1]", 3, "7", None)
    assert main(["--nats", nats_url, "set", run_id, "n=x", "name=y"]) == 4  # refused: nothing
    assert (ctl.state.name, ctl.state.n) == ("[1]", 3)


@pytest.mark.anyio
async def test_a_synchronised_set_reads_the_text_once_for_every_rank(
    ctl: Control[State], nats_url: str, run_id: str
) -> None:
    ctl.sync(0)  # the program reports its step
    async with await Client.connect(nats_url) as client:
        res = await client.set_text(run_id, "all", "name", "[2]", sync=True, margin=3)
        assert isinstance(res, Gathered) and res.at_step == 3 and not res.errors
        ctl.sync(2)
        assert ctl.state.name == "x"  # not yet
        ctl.sync(3)
        assert ctl.state.name == "[2]"  # read as the text, as the str field wants


# --- the typed docs page ---------------------------------------------------------------


def test_each_run_has_a_swagger_page_typed_from_its_model(
    ctl: Control[State], gateway: GatewayFactory, run_id: str
) -> None:
    client = gateway()
    page = client.get(f"/runs/{run_id}/docs")
    assert page.status_code == 200 and f"/runs/{run_id}/openapi.json" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    for asset in (
        "/static/vendor/swagger-ui/swagger-ui-bundle.js",
        "/static/vendor/swagger-ui/swagger-ui.css",
        "/static/docs.js",
    ):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
        assert asset in page.text
    assert "swagger-ui-bundle.js" in client.get("/docs").text  # the gateway's own, no CDN
    # linked from the console at /: each run's page links its typed docs
    assert "/static/js/main.js" in client.get("/").text
    assert "href: `${base}/docs`" in client.get("/static/js/run.js").text

    spec = client.get(f"/runs/{run_id}/openapi.json").json()
    base = f"/runs/{run_id}/ranks/{{rank}}"
    paths = spec["paths"]

    def query_schema(path: str) -> dict[str, Any]:
        (value,) = [p for p in paths[path]["put"]["parameters"] if p["name"] == "value"]
        return dict(value["schema"])

    assert query_schema(f"{base}/set/kind")["enum"] == ["sgd", "adam"]  # a dropdown
    assert query_schema(f"{base}/set/flag")["type"] == "boolean"
    assert query_schema(f"{base}/set/lr")["exclusiveMinimum"] == 0
    assert query_schema(f"{base}/set/bar/baz")["type"] == "integer"
    tags = paths[f"{base}/set/tags"]["put"]["requestBody"]["content"]["application/json"]
    assert tags["schema"]["type"] == "array"
    bar = paths[f"{base}/set/bar"]["patch"]["requestBody"]["content"]["application/json"]
    assert set(bar["schema"]["properties"]) == {"foo", "baz"} and "required" not in bar["schema"]
    assert "get" in paths[f"{base}/get/bar/foo"] and "delete" in paths[f"{base}/reset"]
    assert "$defs" not in json.dumps(spec)  # refs point into components
    assert client.get("/runs/no-such-run/openapi.json").status_code == 404

    # the operations it lists work as listed
    r = client.put(f"/runs/{run_id}/ranks/0/set/bar/baz", params={"value": "4"})
    assert r.status_code == 200 and ctl.state.bar.baz == 4
    _validate_openapi(spec)


def _validate_openapi(spec: dict[str, Any]) -> None:
    """The spec is valid OpenAPI 3.1 (schemathesis' loader checks it)."""
    import schemathesis

    schemathesis.openapi.from_dict(spec)


NODE_PAGE = """
const vm = require('vm');
let options = null;
const el = {getAttribute: () => process.argv[2]};
const ctx = {document: {getElementById: () => el},
             sessionStorage: {getItem: () => 'tok3n'},
             SwaggerUIBundle: o => { options = o; }};
vm.runInNewContext(require('fs').readFileSync(process.argv[3], 'utf8'), ctx);
const req = options.requestInterceptor({headers: {}});
console.log(JSON.stringify({url: options.url, auth: req.headers.Authorization}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_the_docs_page_sends_the_consoles_token(
    gateway: GatewayFactory, run_id: str, tmp_path: Path
) -> None:
    client = gateway()
    (tmp_path / "page.js").write_text(client.get("/static/docs.js").text)
    (tmp_path / "harness.js").write_text(NODE_PAGE)
    spec_url = f"/runs/{run_id}/openapi.json"
    out = subprocess.run(
        ["node", str(tmp_path / "harness.js"), spec_url, str(tmp_path / "page.js")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(out.stdout) == {"url": spec_url, "auth": "Bearer tok3n"}


# --- helpers -------------------------------------------------------------------------


def _commands(url: str, run: str) -> Any:
    """Within the block, the verbs of the commands sent to the run (a NATS subscriber of
    its own, so the count is what crossed the bus)."""
    import contextlib
    import threading

    @contextlib.contextmanager
    def watch() -> Iterator[Any]:
        seen: list[str] = []
        ready, done = threading.Event(), threading.Event()

        async def listen() -> None:
            import nats

            nc = await nats.connect(url)
            try:

                async def on(msg: Any) -> None:
                    seen.append(msg.subject.rsplit(".", 1)[-1])

                await nc.subscribe(f"{PREFIX}.{run}.*.cmd.*", cb=on)
                await nc.flush()
                ready.set()
                while not done.is_set():  # noqa: ASYNC110 - a thread sets it
                    await anyio.sleep(0.02)
                await nc.flush()
                await anyio.sleep(0.2)  # late copies would show up here
            finally:
                await nc.close()

        thread = threading.Thread(target=anyio.run, args=(listen,), daemon=True)
        thread.start()
        assert ready.wait(10)
        try:
            yield lambda: list(seen)
        finally:
            done.set()
            thread.join(10)

    return watch()
