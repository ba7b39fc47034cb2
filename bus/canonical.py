"""Canonical JSON: the stable text a step's key and config are hashed from.

A step's identity is its name, its key (the loop item or the function's arguments) and the
hash of its config. The hash must not change between processes, machines or Python
versions, so it is computed from one canonical text, defined here:

1. The value is first *normalised* to plain JSON data:

   - ``None``, ``bool``, ``str`` stay as they are; ``int`` stays an integer.
   - A ``float`` with an integral value below 2**53 becomes that integer (``1.0`` hashes
     like ``1``: YAML, CLI and code spell the same number differently); other floats stay
     floats. NaN and infinities are rejected (JSON has no spelling for them).
   - Mappings become objects. Keys must be strings. Keys starting with the *ignore prefix*
     (default ``"_"``, fluidml's ``config_ignore_prefix``) are dropped, at every depth.
   - Lists and tuples become arrays; sets and frozensets become arrays sorted by the
     canonical text of their elements.
   - pydantic models (``model_dump(mode="json")``), dataclasses (their fields),
     msgspec Structs, enums (their value) and paths (``str``) are converted first.
   - Anything else raises :class:`TypeError` naming where in the value it was found.

2. The normalised value is written as JSON with object keys sorted by code point, no
   whitespace (separators ``,`` and ``:``), non-ASCII characters as UTF-8 (not ``\\u``
   escapes), and numbers as Python writes them (integers in full, floats as the shortest
   text that reads back to the same float: ``0.1``, ``1e-07``, ``1e+16``). This is exactly
   ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``.

3. The hash is the first 16 hex digits of the SHA-256 of that text's UTF-8 bytes.

Pinned by golden values in ``tests/test_steps_canonical.py``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Final

import msgspec

__all__ = [
    "DEFAULT_IGNORE_PREFIX",
    "HASH_CHARS",
    "Hashed",
    "canonical_json",
    "digest",
    "hashed",
    "key_digest",
    "normalize",
]

DEFAULT_IGNORE_PREFIX: Final = "_"
_sha256 = hashlib.sha256
HASH_CHARS: Final = 16
_MAX_EXACT_INT: Final = 2**53


def normalize(value: Any, *, ignore_prefix: str | None = DEFAULT_IGNORE_PREFIX) -> Any:
    """``value`` as plain JSON data (see the module docs), ignored keys dropped."""
    return _norm(value, ignore_prefix or None, "")


def canonical_json(value: Any, *, ignore_prefix: str | None = DEFAULT_IGNORE_PREFIX) -> str:
    """The canonical text of ``value``."""
    return _dumps(normalize(value, ignore_prefix=ignore_prefix))


def digest(text: str) -> str:
    """The hash of a canonical text: the first 16 hex digits of its SHA-256."""
    return _sha256(text.encode("utf-8")).hexdigest()[:HASH_CHARS]


@dataclasses.dataclass(frozen=True, slots=True)
class Hashed:
    """A config (or key) normalised and hashed once; pass it where a config is expected to
    keep a hot loop from re-hashing the same config on every check."""

    value: Any
    text: str
    hash: str


def hashed(value: Any, *, ignore_prefix: str | None = DEFAULT_IGNORE_PREFIX) -> Hashed:
    """``value`` normalised, its canonical text and hash (a :class:`Hashed` is returned as
    it is).

    >>> hashed({"lr": 1.0, "_note": "ignored"}).text
    '{"lr":1}'
    """
    if isinstance(value, Hashed):
        return value
    norm = normalize(value, ignore_prefix=ignore_prefix)
    text = _dumps(norm)
    return Hashed(norm, text, digest(text))


def key_digest(key: Any, *, ignore_prefix: str | None = DEFAULT_IGNORE_PREFIX) -> tuple[Any, str]:
    """(normalised key, hash). Fast path for the keys loops use most: ints and strings."""
    kind = type(key)
    if kind is int:  # the hot path of ``steps()`` over a range: keep it lean
        return key, _sha256(b"%d" % key).hexdigest()[:HASH_CHARS]
    if kind is str:
        return key, digest(json.dumps(key, ensure_ascii=False))
    if key is None:
        return None, _NULL_DIGEST
    h = hashed(key, ignore_prefix=ignore_prefix)
    return h.value, h.hash


def _dumps(norm: Any) -> str:
    return json.dumps(norm, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _where(path: str) -> str:
    return f"at {path!r}" if path else "at the top level"


def _norm(value: Any, prefix: str | None, path: str) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int) and not isinstance(value, enum.Enum):
        return int(value)
    if isinstance(value, float) and not isinstance(value, enum.Enum):
        if not math.isfinite(value):
            raise ValueError(f"config value {_where(path)} is {value!r}: JSON has no {value!r}")
        if value.is_integer() and abs(value) < _MAX_EXACT_INT:
            return int(value)
        return float(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"config key {k!r} {_where(path)} is a {type(k).__name__}: keys must be "
                    "strings (JSON objects have string keys)"
                )
            if prefix is not None and k.startswith(prefix):
                continue
            out[k] = _norm(v, prefix, f"{path}.{k}" if path else k)
        return out
    if isinstance(value, list | tuple):
        return [_norm(v, prefix, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        items = [_norm(v, prefix, f"{path}[]") for v in value]
        return sorted(items, key=_dumps)
    if isinstance(value, enum.Enum):
        return _norm(value.value, prefix, path)
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic v2 model
        return _norm(value.model_dump(mode="json"), prefix, path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _norm(fields, prefix, path)
    if isinstance(value, msgspec.Struct):
        return _norm(msgspec.to_builtins(value), prefix, path)
    raise TypeError(
        f"config value {_where(path)} is a {type(value).__name__}, which has no canonical "
        "JSON form (use str, int, float, bool, None, lists, dicts, or a pydantic model)"
    )


_NULL_DIGEST: Final = digest("null")
