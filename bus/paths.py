"""Dotted paths into JSON-like data: ``optimizer.lr``, ``layers.0.width``, ``tags.-1``.

Pure functions, shared by the client (reading the published state) and the agent (which
first checks the path against the model's declared fields, see ``agent.state``).
"""

from __future__ import annotations

import re
from typing import Any, Final

from runctl.bus.errors import BadPath, UnknownPath

__all__ = ["MAX_PATH_LENGTH", "parse_index", "resolve", "split_path"]

MAX_PATH_LENGTH: Final = 1024
MAX_DEPTH: Final = 64
#: a list index: ASCII digits, an optional minus; never "+1", " 1", "1_0" or other digits
_INDEX: Final = re.compile(r"-?[0-9]+")


def parse_index(part: str) -> int | None:
    """The list index a path segment names, or None if it is not one (``-1`` counts
    from the end). ``int()`` would also take ``+1``, `` 1``, ``1_0`` and fullwidth
    digits: a path must name one thing only."""
    return int(part) if _INDEX.fullmatch(part) else None


def split_path(path: str) -> list[str]:
    """``"a.b.0"`` -> ``["a", "b", "0"]``; ``""`` and ``None``-like paths mean the root."""
    if len(path) > MAX_PATH_LENGTH:
        raise BadPath(path, f"longer than {MAX_PATH_LENGTH} characters")
    if path in ("", "."):
        return []
    parts = path.split(".")
    if len(parts) > MAX_DEPTH:
        raise BadPath(path, f"deeper than {MAX_DEPTH} levels")
    for part in parts:
        if not part:
            raise BadPath(path, "has an empty segment")
        if part.startswith("_"):
            raise BadPath(path, f"segment {part!r} is private")
    return parts


def resolve(data: Any, path: str | None) -> Any:
    """The value at ``path`` inside dicts and lists; raise :class:`UnknownPath` if absent
    (:class:`BadPath` if the path cannot name anything)."""
    if not path:
        return data
    node = data
    walked: list[str] = []
    for part in split_path(path):
        if isinstance(node, dict):
            if part not in node:
                raise UnknownPath(path, f"no field {part!r} in {'.'.join(walked) or 'the state'}")
            node = node[part]
        elif isinstance(node, list):
            index = _index(path, part, len(node))
            node = node[index]
        else:
            where = ".".join(walked) or "the state"
            raise UnknownPath(path, f"{where} is a {type(node).__name__}, it has no {part!r}")
        walked.append(part)
    return node


def _index(path: str, part: str, length: int) -> int:
    index = parse_index(part)
    if index is None:  # not -?[0-9]+: malformed (400); out of range names nothing (404)
        raise BadPath(path, f"{part!r} is not a list index")
    if not -length <= index < length:
        raise UnknownPath(path, f"index {index} out of range for a list of {length}")
    return index
