"""A write's stores acknowledged straight to the writer: one wait instead of polls.

After a write, the writer (:class:`runctl.bus.client.Client`) must not answer until the
registry shows the rank's new state (read-your-writes) and the journal holds its record.
The rank does not wait for either (each wait on the network costs a GIL hand-off in a
program that holds the GIL). So the writer asks for the acknowledgements: its command
carries the header :data:`ACK_TO`, an inbox of its own; the rank publishes its registry
record and journal record with that inbox as their reply subject, so JetStream sends each
store's acknowledgement (``{"stream": ..., "seq": ...}``) to the writer once it is stored,
and the reply says how many to expect (``Ok.acks``). The writer waits for those, for one
rank or 64, on one subscription: no registry or journal reads, no polling, no extra
wake-up of the rank.

Only acknowledgements the writer waits for are sent there (a changed state's record, an
applied write's journal record), so counting them per stream is exact. When they do not
all come in time (an error from the server, a rank of an older version), the writer falls
back to reading the registry and the journal, as before. The rank sends each journal
record sent this way once more a second later with its own acknowledgement (same message
id: the server drops the duplicate), so a record whose first copy was lost is still stored.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Final

import anyio
import msgspec
from nats.aio.msg import Msg

from runctl.bus.inboxes import Inbox

__all__ = ["ACK_TO", "AckInbox", "Acks", "ack_to_of"]

#: the command header naming the writer's inbox for its stores' acknowledgements
ACK_TO: Final = "Runctl-Ack-To"
#: only a plain inbox subject: no wildcards, no spaces (acks go nowhere else)
_INBOX = re.compile(r"_INBOX\.[A-Za-z0-9_.\-]{1,200}")


def ack_to_of(msg: Msg) -> str:
    """The inbox the writer of ``msg`` wants its acknowledgements on, or ``""`` (none, or
    anything but a plain ``_INBOX.`` subject)."""
    value = (msg.headers or {}).get(ACK_TO, "")
    return value if _INBOX.fullmatch(value) and ".." not in value else ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    error: dict[str, object] | None = None


_decode = msgspec.json.Decoder(_PubAck).decode


class Acks:
    """The acknowledgements of one write, counted per stream as they arrive."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.counts: Counter[str] = Counter()
        self.failed = 0
        self._arrived: anyio.Event | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The header to send with the command."""
        return {ACK_TO: self.subject}

    def add(self, data: bytes) -> None:
        """Count one store's acknowledgement (or its refusal) as it arrives."""
        try:
            ack = _decode(data)
        except msgspec.DecodeError:
            self.failed += 1
        else:
            if ack.error is not None or not ack.stream:
                self.failed += 1
            else:
                self.counts[ack.stream] += 1
        if self._arrived is not None:
            self._arrived.set()

    def received(self, wanted: dict[str, int]) -> bool | None:
        """True once ``wanted[stream]`` acknowledgements of each stream arrived, False if
        the server refused a write, None while some are still to come."""
        if self.failed:
            return False
        if all(self.counts[s] >= n for s, n in wanted.items()):
            return True
        return None

    async def wait(self, wanted: dict[str, int]) -> bool:
        """Wait (unbounded: the caller bounds it) until ``wanted[stream]`` acknowledgements
        of each stream arrived; False at once if the server refused a write."""
        while (done := self.received(wanted)) is None:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return done


class AckInbox:
    """The writes' acknowledgements: one wildcard subscription per connection (``<inbox>.*``,
    :class:`runctl.bus.inboxes.Inbox`), one token per write."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    async def expect(self) -> Acks:
        """A fresh :class:`Acks` whose subject routes here; :meth:`done` it after use."""
        _, acks = await self._inbox.open(Acks, _count)
        return acks

    def done(self, acks: Acks) -> None:
        """Stop collecting for ``acks`` (its write was answered, or gave up)."""
        self._inbox.close(acks.subject)


def _count(acks: Acks, msg: Msg) -> bool:
    acks.add(msg.data)
    return False  # a write has several stores: it is done when its writer says so
