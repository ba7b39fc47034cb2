"""How a command reaches its rank(s) and how the answers come back: one request to one
rank, or one publish on the broadcast subject with the replies gathered (scatter-gather).

nats-py has no request-many, so :meth:`Transport.gather` opens a fresh reply subject on
the client's inbox (one wildcard subscription per connection: no subscribe and unsubscribe
per broadcast), publishes once, reads the registry for the ranks it knows alive while the
replies arrive, and stops when every one of them answered, or at the deadline
(docs/protocol.md). No responders is ``NotFound`` at once; a rank the registry knows that
stays silent is ``missing`` (``Timeout`` when nobody answered at all).

:class:`runctl.bus.client.Client` owns one ``Transport``; this module is its machinery.
"""

from __future__ import annotations

import asyncio
import math
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import anyio
import msgspec
from nats import errors as nats_errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from runctl.bus import messages as m
from runctl.bus.direct import written_at_once
from runctl.bus.errors import NotFound, RunctlError, Timeout, from_code, map_nats_error
from runctl.bus.inboxes import Inbox
from runctl.bus.registry import ANSWERING, RankInfo, Registry
from runctl.bus.results import Gathered, Result
from runctl.bus.subjects import rank_key

__all__ = [
    "EXPECTED_TTL",
    "QUIET_AFTER_LAST_REPLY",
    "RECHECK_CACHED_AFTER",
    "REGISTRY_CHECK_AFTER",
    "STALE_GRACE",
    "Settle",
    "Transport",
    "decode_reply",
    "is_no_responders",
    "result_of",
]

#: a request unanswered this long makes the client ask the registry whether the rank exists
REGISTRY_CHECK_AFTER: Final = 0.05
#: with no known live ranks, a broadcast stops this long after the last reply
QUIET_AFTER_LAST_REPLY: Final = 0.15
#: back-to-back broadcasts to a run reuse the registry's live ranks this long (seconds)
EXPECTED_TTL: Final = 0.25
#: a broadcast that reused them reads the registry afresh once no reply came for this long
#: while some of them have not answered (they may have left since: after a stop)
RECHECK_CACHED_AFTER: Final = 0.025
#: a rank the registry shows stale (no heartbeat for three intervals, not exited) gets this
#: long from the broadcast's start to answer: a rank slowed down, not dead, still counts
STALE_GRACE: Final = 0.25

#: what runs on a broadcast's results before it returns: (run, results) -> results
Settle = Callable[[str, list[Result]], Awaitable[list[Result]]]


class Transport:
    """Requests and broadcasts over one NATS connection; ``registry`` opens (or returns)
    the rank registry that decides who is expected to answer; single requests' replies
    arrive on ``inbox`` (the client's, shared with its writes' acknowledgements)."""

    def __init__(self, nc: NATS, registry: Callable[[], Awaitable[Registry]], inbox: Inbox) -> None:
        self.nc = nc
        self._registry = registry
        #: per run: when the registry was read, the ranks it knew alive, and those stale
        self._expected_ranks: dict[str, tuple[float, frozenset[str], frozenset[str]]] = {}
        #: where single requests' replies arrive: one future per request
        self._replies = inbox

    async def request(
        self,
        run: str,
        rank: str,
        subject: str,
        payload: bytes,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        """One request. No responders is NotFound at once; but any subscriber to the
        subject (``nats sub 'runctl.>'``, an observer) suppresses that status, so if no
        reply came after a moment the registry decides: a rank it never saw, or one that
        exited, is NotFound too; a registered rank that stays silent is a Timeout.

        The reply is awaited in the caller's own task on this connection's reply inbox
        (:class:`runctl.bus.inboxes.Inbox`; nats-py's own request works the same way, but
        would need a task of its own to be watched while the registry is asked): the
        registry check is a task of its own only when no reply came within
        :data:`REGISTRY_CHECK_AFTER` (a task group for every request cost the common case,
        a reply within a millisecond, a few event-loop iterations). A reply that comes
        while the registry is asked wins; the deadline bounds both."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            inbox, reply = await self._replies.open(_reply_future, _complete)
            try:
                with written_at_once(self.nc):  # now, and no turn of the flusher for it
                    await self.nc.publish(subject, payload, reply=inbox, headers=headers)
                if not await _within(reply, min(timeout, REGISTRY_CHECK_AFTER)):
                    await self._wait_or_check(reply, run, rank, deadline - loop.time())
                msg = reply.result()
            finally:
                self._replies.close(inbox)
            if is_no_responders(msg):
                raise nats_errors.NoRespondersError
            return msg
        except RunctlError:
            raise
        except Exception as exc:
            raise map_nats_error(exc, run=run, rank=rank) from exc

    async def _wait_or_check(
        self, reply: asyncio.Future[Msg], run: str, rank: str, remaining: float
    ) -> None:
        """Wait for ``reply`` while the registry is asked whether the rank exists: returns
        once the reply is in; NotFound if the registry answers first that nobody serves the
        rank; nats' TimeoutError at the deadline."""
        if remaining <= 0:
            raise nats_errors.TimeoutError
        loop = asyncio.get_running_loop()
        end = loop.time() + remaining
        gone = asyncio.ensure_future(self._gone(run, rank))
        try:
            await asyncio.wait((reply, gone), timeout=remaining, return_when=FIRST_COMPLETED)
            if reply.done():
                return
            if gone.done() and gone.result():
                raise NotFound(run, rank)
            if not await _within(reply, end - loop.time()):
                raise nats_errors.TimeoutError
        finally:
            gone.cancel()

    async def _gone(self, run: str, rank: str) -> bool:
        """The registry never saw the rank, or saw it exit (False: no registry to ask)."""
        try:
            registry = await self._registry()
            record = await registry.get(run, rank)
        except Exception:  # no registry: wait for the reply or the deadline
            return False
        return record is None or record.status == "exited"

    async def gather(
        self,
        run: str,
        verb: str,
        subject: str,
        payload: bytes,
        timeout: float,
        settle: Settle | None = None,
        headers: dict[str, str] | None = None,
    ) -> Gathered:
        """One request on the broadcast subject; replies are collected on a fresh reply
        subject of the client's inbox until every rank the registry knows alive has
        answered, or the deadline. The registry is read while the replies come in (see
        :meth:`expected`). Ranks it shows stale (not exited) get :data:`STALE_GRACE` from
        the start to answer too; those that stay silent are listed as ``stale``, not
        ``missing``. ``settle`` runs on the results before the reply subject is closed (the
        client's read-your-writes wait)."""
        gathered = Gathered(run=run, verb=verb)
        answered: set[str] = set()
        expected: frozenset[str] = frozenset()
        #: expected ranks that have not answered yet: each reply costs O(1), not O(ranks)
        waiting: set[str] = set()
        stale: frozenset[str] = frozenset()
        stale_waiting: set[str] = set()
        stale_answered = anyio.Event()
        registry_read = False
        complete = anyio.Event()
        arrived = anyio.Event()
        no_responders = False

        def on_reply(msg: Msg) -> None:
            # called as each reply is read: no per-reply timer task, as next_msg(timeout)
            # has, nor a turn of a subscription task
            nonlocal no_responders
            if is_no_responders(msg):
                no_responders = not answered
                complete.set()
                arrived.set()
                return
            try:
                reply = decode_reply(msg)
            except RunctlError:
                return
            answered.add(reply.rank)
            waiting.discard(reply.rank)
            if reply.rank in stale_waiting:
                stale_waiting.discard(reply.rank)
                if not stale_waiting:
                    stale_answered.set()
            if isinstance(reply, m.Err):
                gathered.errors[reply.rank] = from_code(reply.code, reply.message, reply.detail)
            else:
                gathered.results[reply.rank] = result_of(reply)
            arrived.set()
            if registry_read and expected and not waiting:
                complete.set()

        async def replies_pause(quiet: float, before_the_first: float | None = None) -> bool:
            """Wait until every expected rank has answered (False), or until no reply came
            for ``quiet`` seconds (True; ``before_the_first``: as long, before any came)."""
            nonlocal arrived
            while not complete.is_set():
                count = len(answered)
                arrived = anyio.Event()
                wait = before_the_first if before_the_first is not None and not count else quiet
                with anyio.move_on_after(wait):
                    await arrived.wait()
                if len(answered) == count:
                    return not complete.is_set()
            return False

        inbox, _ = await self._replies.open(_no_item, partial(_each_reply, on_reply))
        try:
            with written_at_once(self.nc):
                await self.nc.publish(subject, payload, reply=inbox, headers=headers)
            sent_at = anyio.current_time()
            deadline = sent_at + timeout
            #: the registry knows a rank of this run that has not exited (None: no registry)
            known: bool | None = None
            cached = False
            with anyio.move_on_after(timeout):
                expected, stale, known, cached = await self.expected(run)
            waiting = set(expected - answered)
            stale_waiting.update(stale - answered)
            registry_read = True
            if expected and not waiting:
                complete.set()
            remaining = deadline - anyio.current_time()
            if known is False and not answered:
                # nobody the registry knows; a subscriber to runctl.> may have hidden the
                # no-responders status, so don't wait out the deadline for it
                remaining = min(remaining, REGISTRY_CHECK_AFTER)
            with anyio.move_on_after(max(0.0, remaining)):
                rest = math.inf
                if expected and cached and await replies_pause(RECHECK_CACHED_AFTER):
                    # the reused list still waits for ranks and the replies have stopped:
                    # some may have left since it was read (a stop), so read it afresh
                    self._expected_ranks.pop(run, None)
                    expected, stale, known, _ = await self.expected(run)
                    waiting = set(expected - answered)
                    stale_waiting.clear()
                    stale_waiting.update(stale - answered)
                    if expected and not waiting:
                        complete.set()
                    if known is False and not answered:
                        rest = REGISTRY_CHECK_AFTER  # as above: nobody left to wait for
                with anyio.move_on_after(rest):
                    if expected:
                        await complete.wait()
                        if stale_waiting:  # a slowed-down rank's answer still counts
                            with anyio.move_on_after(sent_at + STALE_GRACE - anyio.current_time()):
                                await stale_answered.wait()
                    # no live rank known: until quiet after a reply
                    await replies_pause(QUIET_AFTER_LAST_REPLY, before_the_first=math.inf)
            if no_responders:
                raise NotFound(run)
            gathered.missing = sorted(expected - answered, key=rank_key)
            gathered.stale = sorted(stale - answered, key=rank_key)
            if settle is not None:
                settled = await settle(run, list(gathered.results.values()))
                gathered.results = {res.rank: res for res in settled}
            gathered.change_id = next(
                (res.change_id for res in gathered.results.values() if res.change_id), ""
            )
            if gathered.missing or not answered <= expected:
                self._expected_ranks.pop(run, None)  # ranks came or went: read them next time
        except RunctlError:
            raise
        except Exception as exc:
            raise map_nats_error(exc, run=run) from exc
        finally:
            self._replies.close(inbox)  # late replies are dropped
        if not gathered.results and not gathered.errors:
            if known is False:
                raise NotFound(run)
            # Someone subscribes (no no-responders status came back) but nobody answered:
            # that is a silent rank, not a missing run.
            raise Timeout(f"no rank of run {run!r} answered in {timeout:g}s", gathered.missing)
        return gathered

    async def expected(self, run: str) -> tuple[frozenset[str], frozenset[str], bool | None, bool]:
        """The ranks of ``run`` the registry knows alive, those it shows stale, whether it
        knows any rank that has not exited (None: no registry, or it failed: wait until
        quiet instead), and whether the first two came from an earlier broadcast instead of
        the registry.

        Reused for ``EXPECTED_TTL`` seconds by the next broadcasts to the run, a stop's
        included: reading 64 records costs the client more CPU than handling 64 replies,
        and a stop after a stop waited for it (bench_fanout). A broadcast that reuses them
        checks them against the registry if some stay silent (:meth:`gather`). The
        registry itself is up to three heartbeats behind a dead rank anyway."""
        cached = self._expected_ranks.get(run)
        if cached is not None and time.monotonic() - cached[0] < EXPECTED_TTL:
            return cached[1], cached[2], True, True
        try:
            registry = await self._registry()
            infos = [RankInfo.of(r) for r in await registry.records(run, states=False)]
        except Exception:
            return frozenset(), frozenset(), None, False
        # a stalled rank's program is stuck, but its agent answers
        expected = frozenset(info.record.rank for info in infos if info.liveness in ANSWERING)
        stale = frozenset(info.record.rank for info in infos if info.liveness == "stale")
        if expected:
            if len(self._expected_ranks) > 1024:
                self._expected_ranks.clear()
            self._expected_ranks[run] = (time.monotonic(), expected, stale)
        return expected, stale, any(info.liveness != "exited" for info in infos), False


def _no_item(_subject: str) -> None:
    """A broadcast's reply subject carries no item: its replies go to the gather's handler."""


def _each_reply(on_reply: Callable[[Msg], None], _item: None, msg: Msg) -> bool:
    on_reply(msg)
    return False  # a broadcast takes replies until the gather closes its subject


def _reply_future(_subject: str) -> asyncio.Future[Msg]:
    return asyncio.get_running_loop().create_future()


def _complete(reply: asyncio.Future[Msg], msg: Msg) -> bool:
    if not reply.done():
        reply.set_result(msg)
    return True  # one reply per request


async def _within(reply: asyncio.Future[Msg], seconds: float) -> bool:
    """Whether ``reply`` completes within ``seconds`` (it is not cancelled either way)."""
    if not reply.done() and seconds > 0:
        await asyncio.wait((reply,), timeout=seconds)
    return reply.done()


def result_of(reply: m.Ok) -> Result:
    """One rank's ``ok`` reply as a :class:`Result`."""
    return Result(
        reply.rank,
        reply.version,
        reply.value,
        reply.changed,
        change_id=reply.change_id,
        journaled=True if reply.journaled else None,
        acks=reply.acks,
    )


def is_no_responders(msg: Msg) -> bool:
    """The server's own 503 status: nobody subscribes to the subject."""
    headers = msg.headers or {}
    return headers.get("Status") == "503" and not msg.data


def decode_reply(msg: Msg) -> m.Reply:
    """A reply, or ``RunctlError`` for bytes that are not one."""
    try:
        return m.decode_reply(msg.data)
    except msgspec.DecodeError as exc:
        raise RunctlError(f"undecodable reply on {msg.subject}: {exc}") from exc
