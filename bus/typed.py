"""Text as typed (``?value=0.01``, ``runctl set RUN lr=0.01``): its JSON reading.

Pure: the agent decides with it whether a field takes the JSON reading or the text itself
(:mod:`runctl.agent.typed_text`); the CLI uses it to refuse, before sending anything, text
that is nested too deeply to be read at all.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from runctl.bus import jsonform

__all__ = ["NOT_JSON", "parse_typed"]

#: what :func:`parse_typed` returns for text that is not JSON
NOT_JSON: Final = object()


def parse_typed(text: str) -> Any:
    """The JSON reading of ``text``, or :data:`NOT_JSON`. ``NaN``, ``Infinity`` and
    ``-Infinity`` read as the strings of that name (bus.jsonform): a ``float`` field takes
    them where the model allows non-finite values. Text nested too deeply to read is
    refused (``BadRequest``).

    >>> parse_typed("0.01"), parse_typed("adam") is NOT_JSON
    (0.01, True)
    """
    try:
        return jsonform.decode(text)
    except msgspec.DecodeError:
        return NOT_JSON
