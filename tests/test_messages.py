"""Wire messages: versioned tags, round trips, defaults for empty payloads, compatibility."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from runctl.bus import messages as m

COMMANDS: list[msgspec.Struct] = [
    m.Get(),
    m.Get(path="optimizer.lr"),
    m.Set(path="optimizer.lr", value=0.01),
    m.Set(path="", value={"a": [1, {"b": None}]}),
    m.Patch(value={"optimizer": {"lr": 0.5}}),
    m.Patch(value={"lr": 0.5}, path="optimizer"),
    m.Reset(),
    m.Stop(),
    m.Stop(reason="operator asked"),
    m.Schema(),
    m.Ping(),
]


def _tag(msg: msgspec.Struct) -> str:
    tag = msgspec.json.decode(m.encode(msg))["t"]
    assert isinstance(tag, str)
    return tag


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: type(c).__name__)
def test_command_round_trip(cmd: msgspec.Struct) -> None:
    verb = next(v for v, cls in m.COMMAND_TYPES.items() if type(cmd) is cls)
    data = m.encode(cmd)
    assert m.decode_command(verb, data) == cmd
    assert _tag(cmd) == f"{verb}/1"


def test_every_message_tag_is_versioned() -> None:
    samples: list[msgspec.Struct] = [
        *(cls(**_required(cls)) for cls in m.COMMAND_TYPES.values()),
        m.Ok(run="r", rank="0", version=1),
        m.Err(run="r", rank="0", code="bad_path", message="no"),
        m.StateMsg(run="r", rank="0", version=1, ts=1.0, state={}),
        m.Event(run="r", rank="0", kind="started", ts=1.0),
        _record(),
    ]
    for msg in samples:
        name, _, version = _tag(msg).partition("/")
        assert name and version.isdigit(), _tag(msg)
    assert _tag(m.Get()) == "get/1"
    assert _tag(m.Ok(run="r", rank="0", version=0)) == "ok/1"
    assert _tag(m.Err(run="r", rank="0", code="x", message="y")) == "err/1"


def _required(cls: type[Any]) -> dict[str, Any]:
    """Minimal arguments for a command's required fields."""
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    values: dict[str, Any] = {"path": "a", "value": {}, "change_id": "c", "values": {"a": 1}}
    return {name: values[name] for name, f in fields.items() if f.required}


def _record(**overrides: Any) -> m.RankRecord:
    fields: dict[str, Any] = {
        "run": "exp1",
        "rank": "0",
        "host": "h",
        "pid": 42,
        "started": 1.0,
        "heartbeat": 2.0,
        "heartbeat_interval": 1.0,
        "version": 3,
        "state": {"lr": 0.1},
    }
    return m.RankRecord(**{**fields, **overrides})


def test_reply_state_event_record_round_trip() -> None:
    ok = m.Ok(run="r", rank="1", version=4, value={"lr": 0.5}, changed=True)
    err = m.Err(
        run="r",
        rank="1",
        code="validation",
        message="bad",
        detail=[{"type": "greater_than", "loc": ["lr"], "msg": "> 0", "input": -1}],
        version=4,
    )
    assert m.decode_reply(m.encode(ok)) == ok
    assert m.decode_reply(m.encode(err)) == err
    state = m.StateMsg(run="r", rank="1", version=4, ts=1.5, state={"a": [1]}, cause="set")
    assert m.decode_state(m.encode(state)) == state
    event = m.Event(
        run="r", rank="1", kind="stop_requested", ts=1.5, version=4, data={"reason": "x"}
    )
    assert m.decode_event(m.encode(event)) == event
    record = _record(status="exited", stop_requested=True, world_size=8, model="Cfg")
    assert m.decode_record(m.encode(record)) == record


def test_raw_state_is_embedded_as_json_not_as_a_string() -> None:
    """Agents send the state as pre-encoded JSON; readers see an object, not a string."""
    msg = m.StateMsg(run="r", rank="0", version=1, ts=1.0, state=msgspec.Raw(b'{"x":1}'))
    assert msgspec.json.decode(m.encode(msg))["state"] == {"x": 1}
    assert m.decode_state(m.encode(msg)).state == {"x": 1}


@pytest.mark.parametrize("payload", [b"", b"  ", b"\n"])
def test_empty_payload_means_the_verbs_defaults(payload: bytes) -> None:
    assert m.decode_command("get", payload) == m.Get(path=None)
    assert m.decode_command("reset", payload) == m.Reset()
    assert m.decode_command("stop", payload) == m.Stop(reason="", mode="graceful")
    assert m.decode_command("schema", payload) == m.Schema()
    assert m.decode_command("ping", payload) == m.Ping()


def test_empty_payload_for_a_verb_with_required_fields_is_an_error() -> None:
    with pytest.raises(TypeError, match="path"):
        m.decode_command("set", b"")


@pytest.mark.parametrize(
    ("verb", "cmd"),
    [
        ("get", m.Set(path="a", value=1)),
        ("set", m.Get()),
        ("stop", m.Reset()),
        ("ping", m.Stop()),
        ("patch", m.Set(path="a", value={})),
    ],
)
def test_tag_must_match_the_subjects_verb(verb: str, cmd: msgspec.Struct) -> None:
    with pytest.raises(ValueError, match=verb):
        m.decode_command(verb, m.encode(cmd))


@pytest.mark.parametrize(
    "payload",
    [
        b"{",  # not JSON
        b"[1, 2]",  # not an object
        b'{"t":"get/2"}',  # an unknown (future, incompatible) version
        b'{"t":"nope/1"}',
        b'{"t":"patch/1","value":[1]}',  # patch value must be an object
        b'{"t":"set/1","value":1}',  # missing path
        b'{"t":"get/1","path":5}',
    ],
)
def test_malformed_commands_raise_msgspec_errors(payload: bytes) -> None:
    verb = "patch" if b"patch" in payload else "set" if b"set" in payload else "get"
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        m.decode_command(verb, payload)


def test_older_messages_without_optional_fields_decode_with_defaults() -> None:
    """A newer reader accepts what an older writer sent (new fields have defaults)."""
    ok = m.decode_reply(b'{"t":"ok/1","run":"r","rank":"0","version":2}')
    assert isinstance(ok, m.Ok) and ok.value is None and ok.changed is False
    err = m.decode_reply(b'{"t":"err/1","run":"r","rank":"0","code":"bad_path","message":"m"}')
    assert isinstance(err, m.Err) and err.detail == [] and err.version == 0
    state = m.decode_state(b'{"t":"state/1","run":"r","rank":"0","version":1,"ts":1,"state":{}}')
    assert state.cause == "heartbeat"
    event = m.decode_event(b'{"t":"event/1","run":"r","rank":"0","kind":"started","ts":1}')
    assert event.version == 0 and event.data == {}
    record = m.decode_record(
        b'{"t":"rank/1","run":"r","rank":"0","host":"h","pid":1,"started":1,"heartbeat":1,'
        b'"heartbeat_interval":1,"version":0,"state":null}'
    )
    assert record.status == "running" and record.stop_requested is False
    assert record.world_size is None and record.model == ""
    stop = m.decode_command("stop", b'{"t":"stop/1"}')
    assert stop == m.Stop()
    patch = m.decode_command("patch", b'{"t":"patch/1","value":{"a":1}}')
    assert patch == m.Patch(value={"a": 1}, path=None)


def test_newer_messages_with_unknown_fields_still_decode() -> None:
    """An older reader ignores fields a newer writer added."""
    ok = m.decode_reply(b'{"t":"ok/1","run":"r","rank":"0","version":2,"from_the_future":[1]}')
    assert ok == m.Ok(run="r", rank="0", version=2)
    get = m.decode_command("get", b'{"t":"get/1","path":"a","added_later":true}')
    assert get == m.Get(path="a")


def test_reply_decoder_tells_ok_from_err() -> None:
    assert isinstance(m.decode_reply(m.encode(m.Ok(run="r", rank="0", version=0))), m.Ok)
    err = m.Err(run="r", rank="0", code="c", message="x")
    assert isinstance(m.decode_reply(m.encode(err)), m.Err)
    with pytest.raises(msgspec.ValidationError):
        m.decode_reply(m.encode(m.Get()))


def test_a_record_head_is_a_record_whose_state_stays_raw_json() -> None:
    record = m.RankRecord(
        run="r",
        rank="0",
        host="h",
        pid=1,
        started=1.0,
        heartbeat=2.0,
        heartbeat_interval=1.0,
        version=7,
        state={"lr": 0.1, "nested": {"a": [1, 2]}},
        status="exited",
    )
    head = m.decode_record_head(m.encode(record))
    assert isinstance(head, m.RankRecord)
    assert (head.version, head.status, head.heartbeat) == (7, "exited", 2.0)
    assert isinstance(head.state, msgspec.Raw)
    assert msgspec.json.decode(head.state) == record.state
