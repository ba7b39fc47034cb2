"""How values look in JSON on every surface: the bus, HTTP, the CLI, the registry.

JSON has no NaN or infinity. runctl writes a non-finite float as one of the strings
``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (pydantic's ``ser_json_inf_nan="strings"``):

- every reader parses it: ``jq``, a browser's ``JSON.parse``, msgspec, any NATS client.
  The bare tokens ``NaN``/``Infinity`` that Python's ``json`` module writes are not JSON:
  one diverged loss would make the whole state unreadable to all of them;
- it reads back: pydantic accepts these strings for a ``float`` field (where the model
  allows non-finite values), and ``float("NaN")``, ``float("-Infinity")`` in Python or
  ``Number("Infinity")`` in JavaScript give the number;
- it is never ``null``, which would turn a non-Optional float into a value the model
  refuses (and an Optional one into None).

Incoming JSON is read leniently: the bare tokens (what ``json.dumps`` and ``requests``
send for ``float("nan")``) are taken as the same strings.

Pure functions: no I/O.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import msgspec
import pydantic_core

from runctl.bus.errors import BadRequest

__all__ = ["NON_FINITE", "decode", "dumps", "wire_value"]

#: the JSON form of each non-finite float
NON_FINITE: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

_msgspec_decode = msgspec.json.decode


def _form(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def wire_value(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its JSON form (msgspec, which
    encodes the bus's messages, would write ``null``). The same object when there is none."""
    if isinstance(value, float):
        return value if math.isfinite(value) else _form(value)
    if isinstance(value, dict):
        items = {k: wire_value(v) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    if isinstance(value, list | tuple):
        converted = [wire_value(v) for v in value]
        if all(a is b for a, b in zip(converted, value, strict=True)):
            return value
        return converted
    return value


def dumps(value: Any) -> bytes:
    """JSON of plain data (dicts, lists, str, numbers), non-finite floats as strings."""
    return pydantic_core.to_json(value, inf_nan_mode="strings")


def decode(raw: bytes | str, what: str = "the value") -> Any:
    """Parse JSON as runctl reads it. Besides strict JSON (msgspec), the bare ``NaN``,
    ``Infinity`` and ``-Infinity`` tokens are read as their strings and a number beyond
    a float's range (``1e999``) as ``"Infinity"``, as Python's ``json`` and JavaScript
    read them. Raises ``msgspec.DecodeError`` for what is not JSON, :class:`BadRequest`
    for invalid UTF-8, a document nested too deeply or a value the bus cannot carry."""
    try:
        return _msgspec_decode(raw)
    except RecursionError:  # 100k-deep nesting is not a DecodeError in msgspec
        raise BadRequest(f"{what} is nested too deeply") from None
    except UnicodeError:  # nor is invalid UTF-8 (or a lone surrogate in a str)
        raise BadRequest(f"{what} is not valid UTF-8") from None
    except msgspec.DecodeError as exc:  # also msgspec's "out of range"
        strict = exc
    try:
        value = json.loads(raw, parse_constant=str)
    except (ValueError, RecursionError):  # not JSON (or a 5000-digit integer): say why
        raise strict from None
    value = wire_value(value)
    try:
        msgspec.json.encode(value)  # what the bus must carry
    except (msgspec.EncodeError, OverflowError, ValueError) as exc:
        raise BadRequest(f"{what} cannot be sent: {exc}") from None
    return value
