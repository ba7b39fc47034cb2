"""What the HTTP routes and the CLI share: how several ``PATH=VALUE`` assignments become one
atomic patch, and how typed values are sent.

A value goes as the text typed, and the rank reads it knowing its model: JSON if the field
takes it so (``0.01`` a number, ``null``, ``[1, 2]``), else the text itself (``adam``;
``123`` or ``[1]`` for a ``str`` field, as Freak, which let FastAPI parse the query for the
field's type); ``'"5"'`` is the string ``5``. One request, whatever the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runctl.bus.client import Client, Gathered, Result
from runctl.bus.errors import BadRequest
from runctl.bus.paths import parse_index, split_path
from runctl.bus.typed import parse_typed

__all__ = [
    "Assignment",
    "assignments_patch",
    "parse_assignment",
    "patch_assignments",
    "set_text",
]


@dataclass(frozen=True, slots=True)
class Assignment:
    """One ``PATH=VALUE`` as typed: the path and the text of the value."""

    path: str
    text: str

    @property
    def parts(self) -> list[str]:
        """The path's segments (``BadPath`` if it is not a valid path)."""
        return split_path(self.path)


def parse_assignment(item: str) -> Assignment:
    """``"optimizer.lr=0.01"`` -> ``Assignment("optimizer.lr", "0.01")``, the path checked.

    >>> parse_assignment("optimizer.lr=0.01").text
    '0.01'
    """
    path, sep, text = item.partition("=")
    if not sep or not path.strip():
        raise BadRequest(f"{_short(item)!r} is not PATH=VALUE")
    assignment = Assignment(path.strip(), text)
    assignment.parts  # noqa: B018 - checks the path now (BadPath names the problem)
    parse_typed(text)  # refuses text nested too deeply to be read, before sending it
    return assignment


def assignments_patch(assignments: Sequence[Assignment]) -> dict[str, Any]:
    """One nested patch from several assignments (applied atomically by the agent), each
    value the text as typed (the agent reads it: see ``Patch.texts``)."""
    patch: dict[str, Any] = {}
    for a in assignments:
        parts = a.parts
        if not parts:
            raise BadRequest("an assignment needs a path (PATH=VALUE)")
        if any(parse_index(p) is not None for p in parts):
            # a patch merges objects: "layers.0.width" would replace the list by an object
            raise BadRequest(f"{a.path!r} goes through a list index: set it in its own command")
        node = patch
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BadRequest(f"{a.path!r} conflicts with another assignment")
            node = child
        if parts[-1] in node:
            raise BadRequest(f"{a.path!r} is assigned twice (or inside another assignment)")
        node[parts[-1]] = a.text
    return patch


# --- sending: the rank reads the typed text, knowing its model ------------------------


async def set_text(
    client: Client, run: str, rank: str, path: str, text: str, **options: Any
) -> Result | Gathered:
    """Set ``path`` from ``text`` as typed (the rank decides: JSON, else the text)."""
    return await client.set_text(run, rank, path, text, **options)


async def patch_assignments(
    client: Client, run: str, rank: str, assignments: Sequence[Assignment], **options: Any
) -> Result | Gathered:
    """Several assignments as one atomic patch of typed text (one request)."""
    patch = assignments_patch(assignments)
    texts = [a.path for a in assignments]
    return await client.patch(run, rank, patch, texts=texts, **options)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
