"""The agent's pure command core (runctl.agent.commands): no NATS, no threads, no agent.
Each test hands bytes or a decoded command to the core and checks the outcome."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from pydantic import BaseModel, Field, field_validator

from runctl.agent.commands import (
    MAX_ERRORS,
    Outcome,
    RankState,
    StopEffect,
    apply,
    execute,
    request_stop,
    verb_of,
)
from runctl.agent.state import LiveState
from runctl.bus import messages as m


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)


class Cfg(BaseModel):
    x: int = 0
    opt: Opt = Opt()
    tags: dict[str, int] = {}

    @field_validator("x")
    @classmethod
    def _buggy(cls, v: int) -> int:
        if v == 666:
            raise ZeroDivisionError("a bug in the user's validator")
        return v


def make(**kwargs: Any) -> RankState:
    return RankState(
        run="r1", rank="3", live=LiveState(Cfg()), host="h", pid=42, started=100.0, **kwargs
    )


def run(rank: RankState, verb: str, cmd: m.Command | bytes) -> Outcome:
    data = cmd if isinstance(cmd, bytes) else m.encode(cmd)
    return execute(rank, verb, data, now=110.0)


def ok(outcome: Outcome) -> m.Ok:
    assert isinstance(outcome.reply, m.Ok), outcome.reply
    return outcome.reply


def err(outcome: Outcome) -> m.Err:
    assert isinstance(outcome.reply, m.Err), outcome.reply
    return outcome.reply


def value(reply: m.Ok) -> Any:
    return msgspec.json.decode(msgspec.json.encode(reply.value))


# --- reads ---------------------------------------------------------------------------------


def test_get_reads_the_state_or_one_path_and_changes_nothing() -> None:
    rank = make()
    whole = ok(run(rank, "get", m.Get()))
    assert value(whole) == Cfg().model_dump() and whole.changed is False
    assert whole.run == "r1" and whole.rank == "3" and whole.version == 0
    assert value(ok(run(rank, "get", m.Get(path="opt.lr")))) == 0.1
    assert run(rank, "get", m.Get()).new_state is None


def test_an_empty_payload_is_the_verbs_defaults() -> None:
    assert value(ok(run(make(), "get", b""))) == Cfg().model_dump()


def test_schema_and_ping() -> None:
    rank = make()
    assert value(ok(run(rank, "schema", m.Schema())))["title"] == "Cfg"
    rank.clock.observe(7, now=1.0)
    pinged = value(ok(run(rank, "ping", m.Ping())))
    assert pinged == {
        "host": "h",
        "pid": 42,
        "uptime": 10.0,
        "step": 7,
        "step_rate": 0.0,
        "pending": [],
    }


# --- changes -------------------------------------------------------------------------------


def test_set_changes_the_live_model_in_place_and_returns_the_state_to_publish() -> None:
    rank = make()
    opt = rank.live.model.opt
    outcome = run(rank, "set", m.Set(path="opt.lr", value=0.5))
    reply = ok(outcome)
    assert reply.changed and reply.version == 1 and opt.lr == 0.5
    assert outcome.new_state is not None
    assert msgspec.json.decode(outcome.new_state)["opt"]["lr"] == 0.5
    assert value(reply) == msgspec.json.decode(outcome.new_state)
    assert outcome.effects == ()


def test_a_change_to_the_same_value_publishes_nothing() -> None:
    rank = make()
    outcome = run(rank, "set", m.Set(path="x", value=0))
    assert ok(outcome).changed is False and outcome.new_state is None
    assert rank.live.version == 0


def test_patch_and_reset() -> None:
    rank = make()
    assert ok(run(rank, "patch", m.Patch(value={"x": 2, "opt": {"lr": 0.3}}))).changed
    assert rank.live.model.x == 2 and rank.live.model.opt.lr == 0.3
    reset = run(rank, "reset", m.Reset())
    assert ok(reset).changed and rank.live.model == Cfg() and ok(reset).version == 2


def test_a_refused_change_is_an_error_reply_and_changes_nothing() -> None:
    rank = make()
    outcome = run(rank, "set", m.Set(path="opt.lr", value=-1))
    reply = err(outcome)
    assert reply.code == "validation" and reply.detail[0]["loc"] == ["opt", "lr"]
    assert outcome.new_state is None and rank.live.model.opt.lr == 0.1
    assert err(run(rank, "set", m.Set(path="nope", value=1))).code == "unknown_path"


def test_a_bug_in_the_users_validator_is_an_internal_error_not_a_crash() -> None:
    reply = err(run(make(), "set", m.Set(path="x", value=666)))
    assert reply.code == "internal" and "ZeroDivisionError" in reply.message


def test_a_rejection_lists_at_most_max_errors() -> None:
    rank = make()
    many = {f"k{i}": "not an int" for i in range(MAX_ERRORS * 3)}
    reply = err(run(rank, "set", m.Set(path="tags", value=many)))
    assert len(reply.detail) == MAX_ERRORS + 1
    assert reply.detail[-1]["type"] == "too_many_errors"
    assert f"{MAX_ERRORS * 2} more" in reply.detail[-1]["msg"]


# --- what never gets as far as a command ----------------------------------------------------


def test_bad_input_becomes_an_error_reply() -> None:
    rank = make(max_payload=100)
    too_big = err(run(rank, "set", b"{" + b" " * 200 + b"}"))
    assert too_big.code == "too_large"
    assert err(run(rank, "frobnicate", b"")).code == "bad_request"
    malformed = err(run(rank, "set", b"{not json"))
    assert malformed.code == "bad_request" and "malformed set" in malformed.message
    mismatch = err(run(rank, "set", m.Get()))  # the payload says get, the subject set
    assert mismatch.code == "bad_request"
    assert err(run(rank, "set", b"")).code == "bad_request"  # set has required fields
    assert run(rank, "frobnicate", b"").command is None


# --- deferred changes ------------------------------------------------------------------------


def test_a_change_for_a_later_step_is_validated_now_and_kept() -> None:
    rank = make()
    outcome = apply(rank, m.Set(path="x", value=5, at_step=10), defer=True, new_id=lambda: "c1")
    reply = ok(outcome)
    assert reply.value == {"pending": True, "at_step": 10, "change_id": "c1", "step": None}
    assert rank.live.model.x == 0 and len(rank.pending) == 1 and outcome.new_state is None
    bad = apply(rank, m.Set(path="x", value="no", at_step=10), defer=True)
    assert err(bad).code == "validation" and len(rank.pending) == 1
    (due,) = rank.pending.pop_due(10)
    applied = apply(rank, due.command, defer=False)
    assert ok(applied).changed and rank.live.model.x == 5 and applied.new_state is not None


def test_a_change_for_a_step_already_passed_is_too_late() -> None:
    rank = make()
    rank.clock.observe(20)
    reply = err(run(rank, "set", m.Set(path="x", value=1, at_step=20)))
    assert reply.code == "too_late" and len(rank.pending) == 0


def test_cancel_drops_a_pending_change() -> None:
    rank = make()
    run(rank, "patch", m.Patch(value={"x": 3}, at_step=5, change_id="abc"))
    assert value(ok(run(rank, "cancel", m.Cancel(change_id="abc")))) == {"cancelled": 1}
    assert value(ok(run(rank, "cancel", m.Cancel(change_id="abc")))) == {"cancelled": 0}
    assert len(rank.pending) == 0


# --- stop ----------------------------------------------------------------------------------


def test_stop_sets_the_flag_and_hands_back_its_effect() -> None:
    rank = make()
    first = run(rank, "stop", m.Stop(reason="diverged", mode="terminate", grace=3))
    assert value(ok(first)) == {"stop_requested": True, "mode": "terminate"}
    assert first.effects == (StopEffect("diverged", "terminate", 3.0, first=True),)
    assert rank.stop_requested and rank.stop_reason == "diverged"
    again = run(rank, "stop", m.Stop(reason="really"))
    assert again.effects == (StopEffect("really", "graceful", 30.0, first=False),)
    assert rank.stop_reason == "really"


def test_a_stop_at_a_step_waits_for_it() -> None:
    rank = make()
    outcome = run(rank, "stop", m.Stop(at_step=4))
    assert outcome.effects == () and not rank.stop_requested
    (due,) = rank.pending.pop_due(4)
    assert apply(rank, due.command, defer=False).effects[0].first
    assert rank.stop_requested


def test_request_stop_is_true_only_the_first_time() -> None:
    rank = make()
    assert request_stop(rank, "a") is True
    assert request_stop(rank, "b") is False
    assert rank.stop_reason == "b"


def test_a_stops_reason_is_in_place_before_the_flag_the_program_reads() -> None:
    """The program's thread reads ``stop_requested`` and then ``stop_reason`` while the
    agent's thread sets them: once the flag is visible, the reason must be there too."""
    reasons_when_flagged: list[str] = []

    class Watched(RankState):
        def __setattr__(self, name: str, value: object) -> None:
            if name == "stop_requested" and value:
                reasons_when_flagged.append(self.stop_reason)
            super().__setattr__(name, value)

    rank = Watched(run="r1", rank="3", live=LiveState(Cfg()))
    request_stop(rank, "cli")
    assert reasons_when_flagged == ["cli"]


@pytest.mark.parametrize("verb", list(m.COMMAND_TYPES))
def test_verb_of_every_command(verb: str) -> None:
    cls = m.COMMAND_TYPES[verb]
    sample: dict[str, Any] = {
        "set": {"path": "x", "value": 1},
        "patch": {"value": {}},
        "assign": {"values": {"x": 1}},
    }
    cmd = cls(**sample.get(verb, {"change_id": "c"} if verb == "cancel" else {}))
    assert verb_of(cmd) == verb
