"""Subject builders: every token is checked against ``^[A-Za-z0-9_-]+$`` before a subject is
built, and a bad token raises BadToken naming the token and the problem."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from runctl.bus import subjects as s
from runctl.bus.errors import BadToken, RunctlError

BAD_TOKENS = [
    pytest.param("a.b", id="dot"),
    pytest.param("*", id="star"),
    pytest.param(">", id="gt"),
    pytest.param("a b", id="space"),
    pytest.param("a\tb", id="tab"),
    pytest.param("abc\n", id="trailing-newline"),
    pytest.param("run\u00e9", id="unicode-letter"),
    pytest.param("\u0663", id="unicode-digit"),
    pytest.param("\U0001f600", id="emoji"),
    pytest.param("", id="empty"),
    pytest.param("x" * 10_240, id="10KB"),
    pytest.param("a/b", id="slash"),
    pytest.param("$SYS", id="dollar"),
]

# Every builder, with the position of the token under test filled by ``bad``.
BUILDERS: list[tuple[str, Callable[[str], str]]] = [
    ("command_subject run", lambda bad: s.command_subject(bad, 0, "get")),
    ("command_subject rank", lambda bad: s.command_subject("exp1", bad, "get")),
    ("command_wildcards run", lambda bad: s.command_wildcards(bad, 0)[0]),
    ("command_wildcards rank", lambda bad: s.command_wildcards("exp1", bad)[0]),
    ("state_subject run", lambda bad: s.state_subject(bad, 0)),
    ("state_subject rank", lambda bad: s.state_subject("exp1", bad)),
    ("states_wildcard run", lambda bad: s.states_wildcard(bad)),
    ("event_subject run", lambda bad: s.event_subject(bad, 0, "started")),
    ("event_subject rank", lambda bad: s.event_subject("exp1", bad, "started")),
    ("event_subject kind", lambda bad: s.event_subject("exp1", 0, bad)),
    ("events_wildcard run", lambda bad: s.events_wildcard(bad)),
    ("step_subject run", lambda bad: s.step_subject(bad, 0, "train")),
    ("step_subject scope", lambda bad: s.step_subject("exp1", bad, "train")),
    ("step_subject step", lambda bad: s.step_subject("exp1", 0, bad)),
]


# --- the builders ---------------------------------------------------------------------------


def test_command_subject() -> None:
    assert s.command_subject("exp1", 0, "get") == "runctl.exp1.0.cmd.get"
    assert s.command_subject("exp1", "3", "patch") == "runctl.exp1.3.cmd.patch"
    assert s.command_subject("exp1", "all", "stop") == "runctl.exp1.all.cmd.stop"
    for verb in s.VERBS:
        assert s.command_subject("r", 1, verb) == f"runctl.r.1.cmd.{verb}"


def test_command_subject_rejects_unknown_verb() -> None:
    with pytest.raises(BadToken) as info:
        s.command_subject("exp1", 0, "delete")
    assert info.value.what == "verb"
    assert "delete" in str(info.value)
    assert "get" in info.value.problem  # names the allowed verbs
    with pytest.raises(BadToken):
        s.command_subject("exp1", 0, "*")


def test_command_wildcards() -> None:
    assert s.command_wildcards("exp1", 2) == ("runctl.exp1.2.cmd.*", "runctl.exp1.all.cmd.*")


def test_state_and_event_subjects() -> None:
    assert s.state_subject("exp1", 0) == "runctl.exp1.0.state"
    assert s.event_subject("exp1", 0, "stop_requested") == "runctl.exp1.0.evt.stop_requested"
    assert s.states_wildcard() == "runctl.*.*.state"
    assert s.states_wildcard("exp1") == "runctl.exp1.*.state"
    assert s.events_wildcard() == "runctl.*.*.evt.*"
    assert s.events_wildcard("exp1") == "runctl.exp1.*.evt.*"


def test_step_subjects() -> None:
    assert s.step_subject("exp1", 0, "train") == "runctl.exp1.0.done.train"
    assert s.step_subject("exp1", s.RUN_SCOPE, "download") == "runctl.exp1.run.done.download"


# --- token checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["a", "A-Z_09", "exp-1_b", "0", "x" * s.MAX_TOKEN_LENGTH])
def test_good_tokens_pass_unchanged(token: str) -> None:
    assert s.check_token(token) == token


def test_int_token_becomes_string_but_bool_does_not() -> None:
    assert s.check_token(7) == "7"
    assert s.check_rank(0) == "0"
    with pytest.raises(BadToken) as info:
        s.check_token(True)
    assert "string" in info.value.problem
    with pytest.raises(BadToken):
        s.check_token(None)


@pytest.mark.parametrize("bad", BAD_TOKENS)
def test_bad_token_names_the_token_and_the_problem(bad: str) -> None:
    with pytest.raises(BadToken) as info:
        s.check_token(bad, "run")
    err = info.value
    assert isinstance(err, RunctlError) and isinstance(err, ValueError)
    assert err.code == "bad_token"
    assert err.what == "run"
    assert err.value == bad
    assert err.problem
    message = str(err)
    assert "run" in message and err.problem in message
    # the token is shown (shortened when long: a 10 KB token never floods a log line)
    assert repr(bad[:20])[:-1] in message or bad[:20] in message
    assert len(message) < 300


def test_overlong_token_problem_says_so() -> None:
    with pytest.raises(BadToken) as info:
        s.check_token("x" * (s.MAX_TOKEN_LENGTH + 1), "step")
    assert "longer than 128" in info.value.problem
    assert "..." in str(info.value)


@pytest.mark.parametrize("bad", BAD_TOKENS)
@pytest.mark.parametrize(("where", "build"), BUILDERS, ids=[b[0] for b in BUILDERS])
def test_every_builder_checks_every_token(
    where: str, build: Callable[[str], str], bad: str
) -> None:
    with pytest.raises(BadToken) as info:
        build(bad)
    assert info.value.value == bad, where


# --- the reserved rank tokens -------------------------------------------------------------


def test_all_addresses_every_rank_only_in_commands() -> None:
    assert s.check_rank("all") == "all"
    for build in (
        lambda: s.check_rank("all", allow_all=False),
        lambda: s.state_subject("exp1", "all"),
        lambda: s.event_subject("exp1", "all", "started"),
        lambda: s.command_wildcards("exp1", "all"),
        lambda: s.step_subject("exp1", "all", "train"),
    ):
        with pytest.raises(BadToken) as info:
            build()
        assert info.value.value == "all"


def test_run_is_reserved_for_run_wide_steps() -> None:
    for build in (
        lambda: s.check_rank("run"),
        lambda: s.command_subject("exp1", "run", "get"),
        lambda: s.state_subject("exp1", "run"),
        lambda: s.command_wildcards("exp1", "run"),
    ):
        with pytest.raises(BadToken) as info:
            build()
        assert "reserved" in info.value.problem
    # ... but it is the scope of run-wide step records, and fine as a run id
    assert s.step_subject("exp1", "run", "x") == "runctl.exp1.run.done.x"
    assert s.state_subject("run", 0) == "runctl.run.0.state"
