"""Every NATS subject runctl uses is built here, from validated tokens.

Layout (prefix ``runctl``)::

    runctl.<run>.<rank>.cmd.<verb>     request to one rank      (agent replies)
    runctl.<run>.all.cmd.<verb>        request to every rank    (each agent replies)
    runctl.<run>.<rank>.state          full state: after each change and on heartbeat
    runctl.<run>.<rank>.evt.<kind>     events: started, changed, stop_requested, exited, step_*
    runctl.<run>.<scope>.done.<step>.<id>  one step record (JetStream stream RUNCTL_STEPS):
                                       <id> = <key hash>-<config hash>, or ``_forgotten``
                                       (the step's last forget marker); <scope> is a rank
                                       or ``run`` (see runctl.bus.steps.records)
    runctl.<run>.<rank>.journal.<id>   change journal: what one rank did with change <id>
    runctl.<run>.all.journal.<id>      change journal: run-wide records (schedules, cancels)

A token never contains ``.``, ``*``, ``>`` or whitespace: every token is checked
against ``^[A-Za-z0-9_-]+$`` before a subject is built, so no subject is ever built
from an unchecked string.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from runctl.bus.errors import BadToken

__all__ = [
    "ALL",
    "PREFIX",
    "RUN_SCOPE",
    "VERBS",
    "Verb",
    "check_rank",
    "check_token",
    "command_subject",
    "command_wildcards",
    "commands_wildcard",
    "event_subject",
    "events_wildcard",
    "journal_filter",
    "journal_stream_subjects",
    "journal_subject",
    "rank_key",
    "state_subject",
    "states_wildcard",
    "step_record_subject",
    "step_records_filter",
    "step_records_wildcard",
    "step_subject",
    "steps_stream_subjects",
]

PREFIX: Final = "runctl"
ALL: Final = "all"
#: the "rank" token of run-wide step records (a step any one rank completes for all)
RUN_SCOPE: Final = "run"
MAX_TOKEN_LENGTH: Final = 128

Verb = Literal["get", "set", "patch", "reset", "stop", "schema", "ping", "cancel", "assign"]
VERBS: Final[tuple[Verb, ...]] = (
    "get",
    "set",
    "patch",
    "reset",
    "stop",
    "schema",
    "ping",
    "cancel",
    "assign",
)

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def check_token(value: object, what: str = "token") -> str:
    """Return ``value`` as a subject token, or raise :class:`BadToken` naming the problem."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise BadToken(what, repr(value), "must be a string")
    if len(text) > MAX_TOKEN_LENGTH:
        raise BadToken(what, text, f"is longer than {MAX_TOKEN_LENGTH} characters")
    if not _TOKEN.fullmatch(text):
        raise BadToken(what, text, "may contain only letters, digits, '_' and '-'")
    return text


def check_rank(rank: object, *, allow_all: bool = True) -> str:
    """A rank is a token (normally a number); ``all`` addresses every rank of a run."""
    token = check_token(rank, "rank")
    if token == ALL and not allow_all:
        raise BadToken("rank", token, "'all' is not allowed here")
    if token == RUN_SCOPE:
        raise BadToken("rank", token, f"'{RUN_SCOPE}' is reserved for run-wide steps")
    return token


def rank_key(rank: str) -> tuple[int, str]:
    """Sort key of rank tokens: numbers in numeric order, then the others by name.

    >>> sorted(["10", "2", "b", "0"], key=rank_key)
    ['0', '2', '10', 'b']
    """
    return (int(rank), "") if rank.isdigit() else (1 << 62, rank)


def command_subject(run: str, rank: str | int, verb: str) -> str:
    """``runctl.<run>.<rank>.cmd.<verb>``; ``rank`` may be ``all`` (every rank)."""
    if verb not in VERBS:
        raise BadToken("verb", str(verb), f"must be one of {', '.join(VERBS)}")
    return f"{PREFIX}.{check_token(run, 'run')}.{check_rank(rank)}.cmd.{verb}"


def command_wildcards(run: str, rank: str | int) -> tuple[str, str]:
    """What one agent subscribes to: its own commands and its run's broadcasts."""
    run = check_token(run, "run")
    rank = check_rank(rank, allow_all=False)
    return f"{PREFIX}.{run}.{rank}.cmd.*", f"{PREFIX}.{run}.{ALL}.cmd.*"


def commands_wildcard(run: str | None = None) -> str:
    """Every command to a run's ranks (or every run's): what ``runctl tail --commands`` reads.

    >>> commands_wildcard("exp1")
    'runctl.exp1.*.cmd.*'
    """
    return f"{PREFIX}.{check_token(run, 'run') if run is not None else '*'}.*.cmd.*"


def state_subject(run: str, rank: str | int) -> str:
    """``runctl.<run>.<rank>.state``: where a rank publishes its full state."""
    return f"{PREFIX}.{check_token(run, 'run')}.{check_rank(rank, allow_all=False)}.state"


def states_wildcard(run: str | None = None) -> str:
    """Every rank's state subject, of ``run`` or of every run."""
    return f"{PREFIX}.{check_token(run, 'run') if run is not None else '*'}.*.state"


def event_subject(run: str, rank: str | int, kind: str) -> str:
    """``runctl.<run>.<rank>.evt.<kind>``: one kind of a rank's events."""
    return (
        f"{PREFIX}.{check_token(run, 'run')}.{check_rank(rank, allow_all=False)}"
        f".evt.{check_token(kind, 'event kind')}"
    )


def events_wildcard(run: str | None = None) -> str:
    """Every event of ``run`` (or of every run)."""
    return f"{PREFIX}.{check_token(run, 'run') if run is not None else '*'}.*.evt.*"


def step_subject(run: str, scope: str | int, step: str) -> str:
    """``runctl.<run>.<scope>.done.<step>``: the prefix of a step's records (see
    :func:`step_record_subject`); ``scope`` is a rank or :data:`RUN_SCOPE`."""
    scope_token = check_token(scope, "rank")
    if scope_token == ALL:
        raise BadToken("rank", scope_token, "a step belongs to one rank or to the run")
    return f"{PREFIX}.{check_token(run, 'run')}.{scope_token}.done.{check_token(step, 'step')}"


# --- step records (see runctl.bus.steps): one more token for the record id ---------


def step_record_subject(run: str, scope: str | int, step: str, record_id: str) -> str:
    """``runctl.<run>.<scope>.done.<step>.<id>``: one step record (``<id>`` names the item
    and config, so purging that subject forgets exactly that step)."""
    return f"{step_subject(run, scope, step)}.{check_token(record_id, 'step id')}"


def step_records_filter(
    run: str | None = None, scope: str | int | None = None, step: str | None = None
) -> str:
    """Filter for the records of a run / scope / step name (``*`` where not given)."""
    run_part = check_token(run, "run") if run else "*"
    scope_part = check_token(scope, "rank") if scope is not None else "*"
    step_part = check_token(step, "step") if step else "*"
    return f"{PREFIX}.{run_part}.{scope_part}.done.{step_part}.*"


def step_records_wildcard(run: str | None = None) -> str:
    """Every step record of a run (or of every run), whatever its scope and step."""
    return f"{PREFIX}.{check_token(run, 'run') if run is not None else '*'}.*.done.>"


def steps_stream_subjects() -> list[str]:
    """What the step-log stream captures; disjoint from every command subject."""
    return [f"{PREFIX}.*.*.done.>"]


# --- the change journal (see bus/journal.py): one subject per change and rank ------------


def journal_subject(run: str, rank: str | int, change_id: str) -> str:
    """``runctl.<run>.<rank>.journal.<id>``: what ``rank`` did with change ``<id>``;
    ``rank`` :data:`ALL` holds the run-wide records (a schedule, its cancellation)."""
    return (
        f"{PREFIX}.{check_token(run, 'run')}.{check_rank(rank)}"
        f".journal.{check_token(change_id, 'change id')}"
    )


def journal_filter(
    run: str | None = None, rank: str | int | None = None, change_id: str | None = None
) -> str:
    """Filter for the journal records of a run / rank / change (``*`` where not given)."""
    run_part = check_token(run, "run") if run is not None else "*"
    rank_part = check_rank(rank) if rank is not None else "*"
    id_part = check_token(change_id, "change id") if change_id is not None else "*"
    return f"{PREFIX}.{run_part}.{rank_part}.journal.{id_part}"


def journal_stream_subjects() -> list[str]:
    """What the journal stream captures; disjoint from every command and step subject."""
    return [f"{PREFIX}.*.*.journal.*"]
