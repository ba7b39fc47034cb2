"""How large a state one bus message carries, and what happens above it.

A rank's state travels whole in its state messages, its registry record and the reply to
every change. Each is one NATS message, at most the server's ``max_payload`` (1 MiB by
default; ``max_payload`` in nats.conf raises it, up to 64 MiB). Over it, a message cannot
be sent at all: a change would be applied in the program and then reported failed, and
the registry would keep the old state for good. So (docs/reliability.md, "Large states"):

- a change whose resulting state would be larger than :attr:`SizeLimit.limit` is refused
  before it applies: ``PayloadTooLarge`` (413 ``too_large``), naming the limit and
  ``max_payload``; nothing changes;
- a state that is already larger (the program made it so) is said loudly, on the
  program's stderr and in its log, when it becomes too large; its state message and
  registry record then carry its size instead of the state, and a read answers 413 with
  the same message instead of an old state or a 504.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from runctl.bus.errors import PayloadTooLarge

__all__ = ["ENVELOPE", "SizeLimit"]

#: room kept in each message for what travels around the state (the record's fields, a
#: reply's), so a state under the limit always fits in every message that carries it
ENVELOPE: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class SizeLimit:
    """The largest state (JSON bytes) a server with ``max_payload`` carries."""

    max_payload: int

    @property
    def limit(self) -> int:
        """The largest state's JSON, in bytes."""
        return max(self.max_payload - ENVELOPE, 0)

    def fits(self, size: int) -> bool:
        """Whether a state of ``size`` bytes fits in one message."""
        return size <= self.limit

    def _over(self, size: int) -> str:
        return (
            f"{size:,} bytes: over the {self.limit:,} bytes one bus message carries "
            f"(the server's max_payload of {self.max_payload:,} bytes, less "
            f"{ENVELOPE:,} for the message around it)"
        )

    def refused(self, size: int) -> PayloadTooLarge:
        """The error for a change that would make the state ``size`` bytes."""
        return PayloadTooLarge(
            size,
            self.limit,
            f"the state would be {self._over(size)}; nothing changed. {self._raise_it()}",
        )

    def unreadable(self, size: int, where: str) -> PayloadTooLarge:
        """The error for reading ``where``'s state of ``size`` bytes."""
        return PayloadTooLarge(
            size,
            self.limit,
            f"the state of {where} is {self._over(size)}: no message carries it and "
            f"changes to it are refused until it is smaller. Read one field with "
            f"?fresh=true, or {self._raise_it(lower=True)}",
        )

    def warning(self, size: int, where: str) -> str:
        """What the program is told when its own state became too large."""
        return (
            f"runctl: the state of {where} is {self._over(size)}. The registry and state "
            f"messages carry its size instead, reads of it answer 413 and every change to "
            f"it is refused until it is smaller. {self._raise_it()}"
        )

    @staticmethod
    def _raise_it(*, lower: bool = False) -> str:
        text = "Raise max_payload in nats.conf (up to 64MB; see docs/reliability.md)."
        return text[0].lower() + text[1:] if lower else text
