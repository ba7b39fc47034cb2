"""Values typed as text (``?value=0.01``, ``runctl set RUN lr=0.01``), read the way the
model wants them, in the agent that knows the model.

A typed value is JSON if the field accepts it as JSON (``0.01`` a number, ``null``,
``[1, 2]``, ``{"a": 1}``), else the text itself (``adam``, or ``[1]`` for a ``str``
field, as Freak, which let FastAPI read the query for the field's type). Deciding here
costs the caller nothing: one request, one validation in the common case, two when the
JSON reading is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from runctl.agent.state import LiveState
from runctl.bus.errors import ValidationRejected
from runctl.bus.paths import split_path
from runctl.bus.typed import NOT_JSON, parse_typed

__all__ = ["patch_typed", "set_typed"]


def set_typed(live: LiveState[Any], path: str, text: str, *, dry_run: bool = False) -> Any:
    """Set ``path`` from typed text (module docs); return the value it took. A value that
    fits neither way is refused with the JSON reading's errors (the text's, if it was
    not JSON)."""
    value = parse_typed(text)
    if value is NOT_JSON:
        live.set(path, text, dry_run=dry_run)
        return text
    try:
        live.set(path, value, dry_run=dry_run)
        return value
    except ValidationRejected as as_json:
        try:
            live.set(path, text, dry_run=dry_run)
        except ValidationRejected:
            raise as_json from None
        return text


def patch_typed(
    live: LiveState[Any],
    value: dict[str, Any],
    path: str | None,
    texts: Sequence[str],
    *,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Merge ``value`` whose leaves at ``texts`` (dotted, relative to ``value``) are typed
    text; each is read as JSON unless the model refuses exactly that leaf, then taken as
    the text. Returns the patch applied (all or nothing, as any patch)."""
    base = split_path(path or "")
    leaves = {leaf: split_path(leaf) for leaf in texts}
    patch = copy.deepcopy(value)
    as_text: set[str] = set()
    for leaf, parts in leaves.items():
        parsed = parse_typed(str(_get(patch, parts)))
        if parsed is NOT_JSON:
            as_text.add(leaf)
        else:
            _put(patch, parts, parsed)
    first: ValidationRejected | None = None
    while True:
        try:
            live.patch(patch, path, dry_run=dry_run)
            return patch
        except ValidationRejected as exc:
            first = first or exc
            wrong = [
                leaf
                for leaf, parts in leaves.items()
                if leaf not in as_text and _names(exc, base + parts)
            ]
            if not wrong:
                raise first from None
            for leaf in wrong:
                _put(patch, leaves[leaf], _get(value, leaves[leaf]))
                as_text.add(leaf)


def _names(exc: ValidationRejected, full: list[str]) -> bool:
    """Whether one of the errors is located at ``full`` (or inside it: a union's member)."""
    return any([str(p) for p in err.get("loc", ())][: len(full)] == full for err in exc.errors)


def _get(data: Any, parts: list[str]) -> Any:
    for part in parts:
        data = data[part]
    return data


def _put(data: Any, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        data = data[part]
    data[parts[-1]] = value
