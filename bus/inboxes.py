"""Many short-lived reply subjects on one subscription: ``<inbox>.1``, ``<inbox>.2`` ...

A client that asks for answers on a subject of its own per request (a request's reply, a
write's store acknowledgements) would otherwise subscribe and unsubscribe once per request.
:class:`Inbox` subscribes ``<inbox>.*`` once per connection, on first use, and hands what
arrives on a subject to the item opened with it (``deliver``), until the item is closed or
``deliver`` says it is complete. A client's requests and its writes' acknowledgements share
one: a write's reply and its acknowledgements usually arrive in one read from the socket.
They are handed over as nats-py reads them (:func:`runctl.bus.direct.subscribe_now`), not
on a later turn of a task of the subscription's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from runctl.bus.direct import subscribe_now

__all__ = ["Inbox"]

T = TypeVar("T")


class Inbox:
    """One wildcard subscription per connection, one token per use. ``deliver(item, msg)``
    takes a message for ``item`` and returns True when the item expects no more."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._prefix = ""
        self._sub: Subscription | None = None
        self._open: dict[str, tuple[Any, Callable[[Any, Msg], bool]]] = {}
        self._next = 0

    async def open(
        self, make: Callable[[str], T], deliver: Callable[[T, Msg], bool]
    ) -> tuple[str, T]:
        """A fresh subject routed here and ``make(subject)``, the item its messages go to
        (through ``deliver``)."""
        if self._sub is None:
            prefix = self.nc.new_inbox()
            sub = await subscribe_now(self.nc, f"{prefix}.*", self._on_message)
            if self._sub is None:
                self._prefix, self._sub = prefix, sub
            else:  # another first use subscribed while this one did
                await sub.unsubscribe()
        self._next += 1
        subject = f"{self._prefix}.{self._next}"
        item = make(subject)
        self._open[subject] = (item, deliver)
        return subject, item

    def close(self, subject: str) -> None:
        """Nothing more for ``subject``: what still arrives on it is dropped."""
        self._open.pop(subject, None)

    def _on_message(self, msg: Msg) -> None:
        found = self._open.get(msg.subject)
        if found is not None and found[1](found[0], msg):
            self._open.pop(msg.subject, None)
