"""The Python client: what the gateway, the CLI and users' scripts call.

Single-rank calls return a :class:`Result` or raise a :class:`~bus.errors.RunctlError`.
Calls with ``rank="all"`` scatter-gather: one request on ``runctl.<run>.all.cmd.<verb>``,
replies collected until every rank the registry knows alive has answered (or a deadline),
returned as a :class:`Gathered` with per-rank results, per-rank errors and the ranks that
did not answer.

Reads (``get`` without ``fresh=True``) come from the registry's last published state and
never wake the controlled program.

Why one module of this size: :class:`Client` is the whole API a caller sees (reads, writes,
stops, the change journal, artifacts), each method a few lines with its documentation; the
machinery is elsewhere: requests and scatter-gather in :mod:`runctl.bus.transport`, the
journal's operator side in :mod:`runctl.bus.changes`, the answers in :mod:`runctl.bus.results`.

::

    async with await Client.connect("nats://127.0.0.1:4222") as client:
        result = await client.set("exp1", 0, "optimizer.lr", 0.01)    # one rank: Result
        every = await client.set("exp1", "all", "optimizer.lr", 0.01)  # every rank: Gathered
        print(every.acknowledged, every.missing, every.errors)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import time
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from runctl.bus import changes
from runctl.bus import messages as m
from runctl.bus.acks import AckInbox, Acks
from runctl.bus.artifact_codec import run_prefix
from runctl.bus.artifact_store import ArtifactInfo, ArtifactStore, Progress
from runctl.bus.connection import close_quietly, connect
from runctl.bus.credentials import NatsRole
from runctl.bus.defaults import MAX_PAYLOAD
from runctl.bus.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    RunctlError,
    Unavailable,
    UnreadableRecord,
    from_code,
    map_nats_error,
)
from runctl.bus.identity import author_of
from runctl.bus.inboxes import Inbox
from runctl.bus.journalplan import Entry, history
from runctl.bus.journalstore import STREAM as JOURNAL_STREAM
from runctl.bus.journalstore import confirm, read_journal
from runctl.bus.jsonform import wire_value
from runctl.bus.paths import resolve
from runctl.bus.registry import STREAM as REGISTRY_STREAM
from runctl.bus.registry import RankInfo, Registry, caught_up
from runctl.bus.results import Gathered, Result
from runctl.bus.sizelimit import SizeLimit
from runctl.bus.subjects import (
    ALL,
    check_rank,
    check_token,
    command_subject,
    events_wildcard,
    rank_key,
)
from runctl.bus.transport import Transport, decode_reply, result_of

__all__ = ["ACTING_AS", "DEFAULT_MAX_PAYLOAD", "Client", "Gathered", "Result"]

DEFAULT_MAX_PAYLOAD: Final = MAX_PAYLOAD
#: a synchronised change must reach every rank within this many seconds of its progress
SYNC_LATENCY_BUDGET: Final = 1.0
MIN_SYNC_MARGIN: Final = 2
#: how long a writer waits for the registry to show its write (normally well under 1 ms)
REGISTRY_CATCH_UP: Final = 1.0
#: how long a writer waits for its stores' acknowledgements before it reads them instead
ACK_WAIT: Final = 0.5
#: who the changes sent from this context are by, when not the client's own ``by`` (the
#: gateway sets it per request from the caller's token)
ACTING_AS: ContextVar[m.Author | None] = ContextVar("runctl_acting_as", default=None)


class Client:
    """Read and change the live state of runs over NATS: what the gateway, the CLI and
    users' scripts call. Open one with :meth:`connect`; ``rank`` is a rank or ``"all"``.

    Every method raises a :class:`~runctl.bus.errors.RunctlError` (``NotFound`` at once for
    a run or rank nobody serves, ``Timeout`` naming who did not answer, ...); a write to
    ``"all"`` returns a :class:`Gathered` instead of raising for one rank's rejection.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        timeout: float = 2.0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        by: str | m.Author | None = None,
        journal_timeout: float | None = None,
    ) -> None:
        self.nc = nc
        self.timeout = timeout
        self.max_payload = max_payload
        #: who this client's changes are by, in the change journal (default ``user@host``)
        self.by = author_of(by, nc, via="python")
        #: how long a write waits for the journal to hold every rank's record
        self.journal_timeout = timeout if journal_timeout is None else journal_timeout
        self._registry: Registry | None = None
        #: where replies and the stores' acknowledgements arrive (one subscription)
        inbox = Inbox(nc)
        #: requests and broadcasts (scatter-gather)
        self.transport = Transport(nc, self.registry, inbox)
        #: the inbox the ranks' stores acknowledge this client's writes on
        self._acks = AckInbox(inbox)

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        *,
        name: str = "runctl-client",
        timeout: float = 2.0,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        by: str | m.Author | None = None,
        journal_timeout: float | None = None,
        role: NatsRole | None = "operator",
        retry_initial: bool = False,
        connect_timeout: float = 2.0,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        user_credentials: str | None = None,
        nkeys_seed: str | None = None,
        **nats_options: Any,
    ) -> Client:
        """Connect to NATS and return a client; ``async with`` closes it.

        ``url``: one or several (comma-separated) NATS URLs; default ``$RUNCTL_NATS_URL``
        or ``nats://127.0.0.1:4222``. ``timeout``: how long commands wait for ranks.
        ``max_payload``: the largest command sent (``PayloadTooLarge`` above it). ``by``:
        who the changes are by in the change journal (default ``user@host``);
        ``journal_timeout``: how long a write waits for the journal (default ``timeout``).
        ``role``: with no login in the URL, the environment or the arguments, log in with
        that role's file from ``runctl up`` (``operator`` may change state; ``observer``
        only reads). ``retry_initial``: keep retrying until the server is up, instead of
        raising ``Unavailable``. ``user``/``password``, ``token``, ``user_credentials``
        (a .creds file) and ``nkeys_seed`` (a seed file) are NATS logins. Any other keyword
        goes to nats-py's ``connect`` as it is (``tls=``, ``error_cb=``, ...).

        >>> async with await Client.connect("nats://127.0.0.1:4222", timeout=5) as client:
        ...     infos = await client.ranks("exp1")
        """
        logins: dict[str, Any] = {
            "user": user,
            "password": password,
            "token": token,
            "user_credentials": user_credentials,
            "nkeys_seed": nkeys_seed,
        }
        nc = await connect(
            url,
            name=name,
            role=role,
            retry_initial=retry_initial,
            connect_timeout=connect_timeout,
            **{k: v for k, v in logins.items() if v is not None},
            **nats_options,
        )
        return cls(
            nc, timeout=timeout, max_payload=max_payload, by=by, journal_timeout=journal_timeout
        )

    async def close(self) -> None:
        """Close the connection (quietly, shielded from cancellation: it is cleanup)."""
        await close_quietly(self.nc)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- discovery ----------------------------------------------------------------

    async def registry(self) -> Registry:
        """The rank registry (opened on first use; ``Unavailable`` without JetStream)."""
        if self._registry is None:
            try:
                self._registry = await Registry.open(self.nc)
            except Exception as exc:
                raise Unavailable(f"rank registry unavailable: {map_nats_error(exc)}") from exc
        return self._registry

    async def artifacts(self, run: str) -> list[ArtifactInfo]:
        """The step results and files run ``run`` keeps in the object store, by name::

        for info in await client.artifacts("exp1"):
            print(info.name, info.size)
        """
        prefix = run_prefix(run)
        try:
            store = await ArtifactStore.open(self.nc.jetstream(), create=False)
        except NotFound:
            return []
        return await store.list(prefix)

    async def download(
        self, name: str, path: str | os.PathLike[str], progress: Progress | None = None
    ) -> Path:
        """Stream the stored object ``name`` (see :meth:`artifacts`) into ``path``,
        verified against its digest before it gets that name."""
        store = await ArtifactStore.open(self.nc.jetstream(), create=False)
        return await store.download(await store.ref(name), path, progress)

    async def runs(self) -> list[RankInfo]:
        """Every rank of every run the registry holds, with its liveness."""
        return (await self.scan())[0]

    async def scan(self, run: str | None = None) -> tuple[list[RankInfo], list[UnreadableRecord]]:
        """The ranks the registry holds (of ``run``, else of every run) with their liveness,
        and the records it could not decode (skipped, so that one bad record never hides
        a run: callers report them)."""
        if run is not None:
            check_token(run, "run")
        found = await (await self.registry()).scan(run)
        now = time.time()
        return [RankInfo.of(r, now) for r in found.records], found.unreadable

    async def ranks(self, run: str) -> list[RankInfo]:
        """The ranks of ``run`` the registry holds, with their liveness (``NotFound`` if
        none).

        >>> [i.record.rank for i in await client.ranks("exp1") if i.liveness == "alive"]
        ['0', '1']
        """
        infos, _ = await self.scan(run)
        if not infos:
            raise NotFound(run)
        return infos

    async def rank(self, run: str, rank: str | int) -> RankInfo:
        """One rank's registry record and liveness (``NotFound`` if the registry has none)."""
        check_token(run, "run")  # before the registry is opened: nothing sent for a bad name
        rank = check_rank(rank, allow_all=False)
        record = await (await self.registry()).get(run, rank)
        if record is None:
            raise NotFound(run, str(rank))
        return RankInfo.of(record)

    async def schema(self, run: str, rank: str | int) -> Any:
        """The model's JSON schema (from the registry; asks the rank if not registered)."""
        check_token(run, "run")
        rank = check_rank(rank, allow_all=False)
        schema = await (await self.registry()).schema(run, rank)
        if schema is None:
            result = await self.send(run, rank, m.Schema())
            assert isinstance(result, Result)
            return result.value
        return schema

    # --- commands -----------------------------------------------------------------

    async def get(
        self, run: str, rank: str | int, path: str | None = None, *, fresh: bool = False
    ) -> Result | Gathered:
        """The state (or the value at ``path``). From the registry unless ``fresh``."""
        if fresh:
            return await self.send(run, rank, m.Get(path=path or None))
        rank = check_rank(rank)
        if rank == ALL:
            gathered = Gathered(run=run, verb="get")
            for info in await self.ranks(run):
                try:
                    gathered.results[info.record.rank] = _from_registry(info, path)
                except RunctlError as exc:
                    gathered.errors[info.record.rank] = exc
            return gathered
        return _from_registry(await self.rank(run, rank), path)

    async def set(
        self,
        run: str,
        rank: str | int,
        path: str,
        value: Any,
        *,
        sync: bool = False,
        margin: int | None = None,
        at_step: int | None = None,
    ) -> Result | Gathered:
        """Replace the value at the dotted ``path``, validated by the program's model
        (``ValidationRejected`` with pydantic's errors, and nothing changed, if it does not
        fit). ``sync=True`` applies it on every rank at the same step (``margin`` steps
        ahead; the program calls ``ctl.sync(step)``); ``at_step``: at that step (journaled:
        ranks that restart before it still apply it there).

        >>> await client.set("exp1", 0, "optimizer.lr", 0.01)
        Result(rank='0', version=4, value={...}, changed=True, ...)
        >>> (await client.set("exp1", "all", "optimizer.lr", 0.01, sync=True)).at_step
        120
        """
        return await self._write(run, rank, m.Set(path=path, value=value), sync, margin, at_step)

    async def set_text(
        self,
        run: str,
        rank: str | int,
        path: str,
        text: str,
        *,
        sync: bool = False,
        margin: int | None = None,
        at_step: int | None = None,
    ) -> Result | Gathered:
        """Set ``path`` from text as typed: JSON if the field takes it as JSON (``0.01``,
        ``null``, ``[1]``), else the text itself (``adam``; ``[1]`` for a ``str`` field).
        The rank decides, knowing its model: one request."""
        cmd = m.Set(path=path, value=text, text=True)
        return await self._write(run, rank, cmd, sync, margin, at_step)

    async def patch(
        self,
        run: str,
        rank: str | int,
        value: dict[str, Any],
        path: str | None = None,
        *,
        sync: bool = False,
        margin: int | None = None,
        at_step: int | None = None,
        texts: Sequence[str] = (),
    ) -> Result | Gathered:
        """Merge ``value`` into the state (or into the object at ``path``): objects merge,
        everything else replaces; all or nothing. ``sync``, ``margin``, ``at_step`` as for
        :meth:`set`; ``texts``: dotted paths inside ``value`` whose values are text as
        typed (read by the rank as in :meth:`set_text`).

        >>> await client.patch("exp1", "all", {"optimizer": {"lr": 0.01, "kind": "adam"}})
        Gathered(run='exp1', verb='patch', results={'0': ..., '1': ...}, ...)
        """
        cmd = m.Patch(value=value, path=path or None, texts=list(texts))
        return await self._write(run, rank, cmd, sync, margin, at_step)

    async def reset(
        self,
        run: str,
        rank: str | int,
        *,
        sync: bool = False,
        margin: int | None = None,
        at_step: int | None = None,
    ) -> Result | Gathered:
        """Back to the state the program had when it called ``control()`` (``sync``,
        ``margin``, ``at_step`` as for :meth:`set`).

        >>> await client.reset("exp1", "all")
        """
        return await self._write(run, rank, m.Reset(), sync, margin, at_step)

    async def _write(
        self,
        run: str,
        rank: str | int,
        cmd: m.Set | m.Patch | m.Reset | m.Stop,
        sync: bool,
        margin: int | None,
        at_step: int | None,
    ) -> Result | Gathered:
        if at_step is not None:
            if sync:
                raise BadRequest("a change is either synchronised or at a given step, not both")
            return await changes.schedule(self, run, rank, cmd, at_step)
        return await (self.send_synced(run, cmd, margin) if sync else self.send(run, rank, cmd))

    # --- the change journal -------------------------------------------------------

    async def history(
        self,
        run: str,
        *,
        rank: str | None = None,
        path: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[Entry]:
        """The run's journaled changes, newest first: who, when, what, at which step, and
        each rank's outcome and diff. Filter by rank, field path, time (unix seconds)."""
        check_token(run, "run")
        if rank is not None:
            rank = check_rank(rank, allow_all=False)
        records = await read_journal(self.nc, run)
        return history(records, rank=rank, path=path, since=since, until=until, limit=limit)

    async def undo(
        self, run: str, change: str | None = None, *, force: bool = False
    ) -> changes.UndoResult:
        """Take back a journaled change (default: the latest not undone): its fields go back
        to their recorded before-values. Conflict if a later change touched them (``force``)."""
        return await changes.undo(self, run, change, force=force)

    async def schedules(self, run: str, *, include_done: bool = False) -> list[Entry]:
        """Changes scheduled at a step (``at_step``) that are still to apply."""
        return await changes.scheduled(self, run, include_done=include_done)

    async def unschedule(self, run: str, change: str) -> dict[str, Any]:
        """Cancel a scheduled change everywhere, in the journal too."""
        return await changes.cancel_schedule(self, run, change)

    async def forget_history(self, run: str) -> int:
        """Remove a run's journal (its history; ranks started afterwards replay nothing)."""
        return await changes.forget_history(self, run)

    async def forget_stop(self, run: str) -> bool:
        """Forget the run's recorded run-wide stop (see :meth:`stop`), so a program started
        again in the run is not stopped at once; True if there was one."""
        return await (await self.registry()).clear_run(check_token(run, "run")) is not None

    async def stop(
        self,
        run: str,
        rank: str | int,
        reason: str = "",
        *,
        mode: m.StopMode = "graceful",
        grace: float = 30.0,
        sync: bool = False,
        margin: int | None = None,
        at_step: int | None = None,
        checkpoint: bool = False,
        checkpoint_timeout: float = 300.0,
    ) -> Result | Gathered:
        """Stop one rank, or every rank (``"all"``). A run-wide stop is also recorded in
        the registry, so a rank that starts later in the same run stops too. ``at_step``:
        stop there (journaled, as a scheduled change).

        ``checkpoint=True`` (run-wide only): every rank saves a checkpoint at the same step
        (``ctl.on_checkpoint``) and then stops; the answer waits, at most
        ``checkpoint_timeout`` seconds, for each rank's report of what it stored
        (``Gathered.checkpoints``; ranks without one in ``no_checkpoint``)::

            stopped = await client.stop("exp1", "all", checkpoint=True)
            stopped.checkpoints["0"]["files"]   # {"model.pt": {"size": ..., "digest": ...}}
        """
        cmd = m.Stop(reason=reason, mode=mode, grace=m.check_grace(grace), checkpoint=checkpoint)
        if at_step is not None and not checkpoint:
            return await self._write(run, rank, cmd, sync, margin, at_step)
        if checkpoint:
            if str(rank) != ALL:
                raise BadRequest(
                    "a checkpointing stop is run-wide (every rank saves at the same step): "
                    "address the run, not one rank"
                )
            return await self._stop_with_checkpoint(run, cmd, margin, checkpoint_timeout)
        if str(rank) != ALL:
            return await (self.send_synced(run, cmd, margin) if sync else self.send(run, rank, cmd))
        # The record (for ranks that start later) is sent first but its ack is awaited
        # after the broadcast: it need not hold up the ranks that are running now.
        ack = await self._record_run_stop(run, cmd)
        try:
            if sync:
                return await self.send_synced(run, cmd, margin)
            # one journal record for the run, by us, instead of one by each rank
            stamped = self._stamped(msgspec.structs.replace(cmd, journaled_by_writer=True))
            assert isinstance(stamped, m.Stop)

            async def journal(gathered: Gathered | None) -> None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.journal_timeout):
                    await changes.journal_run_stop(self, run, stamped, gathered)

            try:
                gathered = await self.send(run, ALL, stamped)
            except NotFound:
                raise  # nobody serves the run: nothing was stopped
            except BaseException:
                await journal(None)  # a Timeout: the ranks may have stopped all the same
                raise
            assert isinstance(gathered, Gathered)
            await journal(gathered)
            return gathered
        finally:
            if ack is not None:
                with anyio.move_on_after(self.timeout), contextlib.suppress(Exception):
                    await ack

    async def _stop_with_checkpoint(
        self, run: str, cmd: m.Stop, margin: int | None, timeout: float
    ) -> Gathered:
        reports: dict[str, dict[str, Any]] = {}
        arrived = anyio.Event()
        wanted: set[str] = set()
        change_id: list[str] = []

        async def on_event(msg: Msg) -> None:
            try:
                event = m.decode_event(msg.data)
            except Exception:
                return
            if event.kind != "checkpoint" or event.data.get("change_id") not in change_id:
                return
            reports[event.rank] = {k: v for k, v in event.data.items() if k != "change_id"}
            if wanted and wanted <= set(reports):
                arrived.set()

        sub = await self.nc.subscribe(events_wildcard(run), cb=on_event)
        try:
            ack = await self._record_run_stop(run, cmd)
            # the id is known before any rank can report: reports are matched by it
            change_id.append(uuid.uuid4().hex)
            gathered = await self.send_synced(
                run, msgspec.structs.replace(cmd, change_id=change_id[0]), margin
            )
            if ack is not None:
                with anyio.move_on_after(self.timeout), contextlib.suppress(Exception):
                    await ack
            if gathered.cancelled:
                return gathered
            wanted.update(gathered.results)
            if not wanted <= set(reports):
                with anyio.move_on_after(timeout):
                    await arrived.wait()
            gathered.checkpoints = {r: reports[r] for r in sorted(reports, key=rank_key)}
            gathered.no_checkpoint = sorted(wanted - set(reports), key=rank_key)
            return gathered
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _record_run_stop(self, run: str, cmd: m.Stop) -> asyncio.Future[Any] | None:
        """Send the run-wide stop record; returns its ack future (None if it could not be
        sent: the broadcast itself still goes out)."""
        check_token(run, "run")
        try:
            registry = await self.registry()
            record = m.RunRecord(
                run=run,
                stop_requested=True,
                reason=cmd.reason,
                ts=time.time(),
                mode=cmd.mode,
                grace=cmd.grace,
            )
            # buffered: the broadcast's write sends it with the command, first
            return await registry.put_run_nowait(record)
        except Exception:
            return None

    async def send_synced(
        self, run: str, cmd: m.Set | m.Patch | m.Reset | m.Stop, margin: int | None = None
    ) -> Gathered:
        """Apply ``cmd`` on every rank at the same step (see agent/pending.py for the rule).

        Asks every rank for its step, picks ``at_step = max(steps) + margin``, sends the
        change deferred to that step, and cancels it everywhere if any rank was too late.
        """
        pings = await self.send(run, ALL, m.Ping())
        assert isinstance(pings, Gathered)
        steps: dict[str, int] = {}
        rate = 0.0
        latest_pending = 0
        for rank, res in pings.results.items():
            step = res.value.get("step") if isinstance(res.value, dict) else None
            if step is None:
                raise BadRequest(
                    f"rank {rank} of run {run!r} has not reported a step: a synchronised "
                    "change needs the program to call ctl.sync(step) at each step"
                )
            steps[rank] = int(step)
            rate = max(rate, float(res.value.get("step_rate") or 0.0))
            # only synchronised ones: a change at a step the user chose may be far ahead
            queued = [p["at_step"] for p in res.value.get("pending") or [] if p.get("synced")]
            latest_pending = max([latest_pending, *queued])
        if margin is None:
            margin = max(MIN_SYNC_MARGIN, math.ceil(rate * SYNC_LATENCY_BUDGET) + 1)
        # Never before a change already waiting: synchronised changes keep their order.
        at_step = max(max(steps.values()) + margin, latest_pending)
        change_id = cmd.change_id or uuid.uuid4().hex
        deferred = msgspec.structs.replace(
            self._stamped(cmd), at_step=at_step, change_id=change_id, synced=True
        )
        gathered = await self.send(run, ALL, deferred)
        assert isinstance(gathered, Gathered)
        gathered.at_step = at_step
        gathered.change_id = change_id
        if gathered.errors or gathered.missing or set(steps) - set(gathered.results):
            # Not every rank took it: take it back everywhere, so no rank applies it alone.
            await self.send(run, ALL, m.Cancel(change_id=change_id))
            gathered.cancelled = True
        else:  # durable: a rank that restarts before at_step applies it there
            gathered.journaled = await changes.write_schedule(self, run, ALL, deferred, at_step)
        return gathered

    async def cancel(self, run: str, rank: str | int, change_id: str) -> Result | Gathered:
        """Take back a synchronised change that has not been applied yet (``change_id`` is
        :attr:`Gathered.change_id` of the ``sync=True`` call).

        >>> await client.cancel("exp1", "all", gathered.change_id)
        """
        return await self.send(run, rank, m.Cancel(change_id=change_id))

    async def ping(self, run: str, rank: str | int) -> Result | Gathered:
        """Ask the rank(s) themselves: ``value`` holds the step, step rate and pending
        changes (a live answer, unlike the registry's last published state).

        >>> (await client.ping("exp1", 0)).value["step"]
        118
        """
        return await self.send(run, rank, m.Ping())

    async def send(
        self, run: str, rank: str | int, cmd: m.Command, *, timeout: float | None = None
    ) -> Result | Gathered:
        """Send any command (a :mod:`runctl.bus.messages` Struct) to one rank, or to every
        rank with ``"all"``; what the other methods call."""
        verb = m.verb_of(cmd)
        subject = command_subject(run, rank, verb)
        if isinstance(cmd, m.Set | m.Patch):  # NaN must not travel as null (jsonform)
            cmd = msgspec.structs.replace(cmd, value=wire_value(cmd.value))
        limit = min(self.max_payload, self.nc.max_payload or self.max_payload)
        payload = m.encode(self._stamped(cmd))
        if len(payload) > limit:
            # the change id and author are not the caller's bytes: the client's limit is
            # on the command as given (stamping only adds bytes, so this is rarely needed)
            given = len(m.encode(cmd))
            if given > limit:
                raise PayloadTooLarge(given, limit)
        if self.nc.max_payload and len(payload) > self.nc.max_payload:
            raise PayloadTooLarge(len(payload), self.nc.max_payload)
        timeout = self.timeout if timeout is None else timeout
        rank = str(rank)
        # a write's stores are acknowledged to us directly: one wait, no polling
        acks = await self._acks.expect() if _ranks_store(cmd, rank) else None
        headers = acks.headers if acks is not None else None
        try:
            if rank == ALL:
                return await self.transport.gather(
                    run,
                    verb,
                    subject,
                    payload,
                    timeout,
                    settle=functools.partial(self._settle, acks=acks),
                    headers=headers,
                )
            msg = await self.transport.request(run, rank, subject, payload, timeout, headers)
            reply = decode_reply(msg)
            if isinstance(reply, m.Err):
                raise from_code(reply.code, reply.message, reply.detail)
            (result,) = await self._settle(run, [result_of(reply)], acks=acks)
            return result
        finally:
            if acks is not None:
                self._acks.done(acks)

    def _stamped(self, cmd: m.Command) -> m.Command:
        """A write gets its change id and its author (the journal records both)."""
        if isinstance(cmd, m.Cancel):
            if cmd.id and cmd.by is not None:
                return cmd
            return msgspec.structs.replace(
                cmd, id=cmd.id or uuid.uuid4().hex, by=cmd.by or self.author()
            )
        if isinstance(cmd, m.Set | m.Patch | m.Reset | m.Stop | m.Assign):
            if cmd.change_id and cmd.by is not None:
                return cmd
            return msgspec.structs.replace(
                cmd, change_id=cmd.change_id or uuid.uuid4().hex, by=cmd.by or self.author()
            )
        return cmd

    def author(self) -> m.Author:
        """Who the changes sent now are by: the gateway's caller (with this connection's
        NATS user), else this client's own ``by``."""
        acting = ACTING_AS.get()
        if acting is None:
            return self.by
        return acting if acting.user else msgspec.structs.replace(acting, user=self.by.user)

    async def _settle(
        self, run: str, results: list[Result], acks: Acks | None = None
    ) -> list[Result]:
        """After a write was answered: wait (bounded) until the registry shows each rank's
        new version and the journal holds each rank's record, both at once. A rank whose
        record did not show up in time is reported ``journaled=False``: nobody is told a
        change is in the journal that the server has not stored.

        With ``acks`` (bus/acks.py), the ranks had the server acknowledge those stores to
        this client: one wait for all of them; reads only for what did not come that way."""
        changed = {r.rank: r.version for r in results if r.changed}
        by_change: dict[str, list[str]] = {}
        for res in results:
            if res.journaled:
                by_change.setdefault(res.change_id, []).append(res.rank)
        if not changed and not by_change:
            return results
        stored: set[tuple[str, str]] = set()
        if acks is not None and all(r.acks for r in results if r.changed or r.journaled):
            wanted = {
                REGISTRY_STREAM: len(changed),
                JOURNAL_STREAM: sum(len(ranks) for ranks in by_change.values()),
            }
            if sum(wanted.values()) == sum(r.acks for r in results):
                wanted = {k: n for k, n in wanted.items() if n}
                if acks.received(wanted):  # they often came with the reply: no timer then
                    return results
                with anyio.move_on_after(ACK_WAIT):
                    if await acks.wait(wanted):
                        return results  # every store acknowledged: journaled as replied

        async def check(change_id: str, ranks: list[str]) -> None:
            found = await confirm(self.nc, run, change_id, ranks, timeout=self.journal_timeout)
            stored.update((change_id, rank) for rank in found)

        async with anyio.create_task_group() as tasks:
            if changed:
                tasks.start_soon(self._registry_caught_up, run, changed)
            for change_id, ranks in by_change.items():
                tasks.start_soon(check, change_id, ranks)
        return [
            r.journaled_as((r.change_id, r.rank) in stored) if r.journaled else r for r in results
        ]

    async def _registry_caught_up(self, run: str, versions: dict[str, int]) -> None:
        """Read-your-writes: agents reply before their registry write is acknowledged (no
        network wait on the program's side), so a writer waits here, bounded, until the
        registry shows each rank's new version; any read issued afterwards sees it."""
        try:
            registry = await self.registry()
        except Unavailable:
            return
        with anyio.move_on_after(REGISTRY_CATCH_UP):
            await caught_up(registry, run, versions)


def _ranks_store(cmd: m.Command, rank: str) -> bool:
    """Whether the ranks store something for ``cmd`` that its writer waits for (and so
    acknowledge it to the writer's inbox). Not a run-wide stop journaled by its writer: the
    ranks store nothing on its way back, and every rank would parse the header for nothing."""
    if isinstance(cmd, m.Stop) and cmd.journaled_by_writer and rank == ALL:
        return False
    return isinstance(cmd, m.WRITES)


def _from_registry(info: RankInfo, path: str | None) -> Result:
    r = info.record
    if r.state_omitted:  # too large for a message: say so, never an old state
        where = f"rank {r.rank} of run {r.run}"
        raise SizeLimit(r.max_payload).unreadable(r.state_omitted, where)
    return Result(
        r.rank,
        r.version,
        resolve(r.state, path),
        source="registry",
        liveness=info.liveness,
        age=info.age,
    )
