"""What the HTTP routes and the CLI share: how a typed-in value is read, how several
``PATH=VALUE`` assignments become one atomic patch.

A value is parsed as JSON, else used as the string it is (``0.01`` is a number, ``adam`` a
string, ``'"5"'`` the string ``5``). A number or boolean that a ``str`` field refuses is
sent again as the text that was typed, so ``name=123`` sets the string ``"123"`` (what
Freak did, by asking FastAPI to parse the query for the field's type).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from runctl.bus import jsonform
from runctl.bus.client import Client, Gathered, Result
from runctl.bus.errors import BadRequest, RunctlError, ValidationRejected
from runctl.bus.paths import parse_index, split_path

__all__ = [
    "Assignment",
    "assignments_patch",
    "parse_assignment",
    "parse_value",
    "patch_assignments",
    "set_text",
]


def parse_value(text: str) -> Any:
    """JSON if it parses, else the text itself. ``NaN``, ``Infinity`` and ``-Infinity``
    are the strings of that name (bus.jsonform: how runctl writes non-finite floats);
    the model decides whether a field takes them."""
    try:
        return jsonform.decode(text)
    except msgspec.DecodeError:
        return text


@dataclass(frozen=True, slots=True)
class Assignment:
    """One ``PATH=VALUE`` as typed: the path and the text of the value."""

    path: str
    text: str

    @property
    def parts(self) -> list[str]:
        """The path's segments (``BadPath`` if it is not a valid path)."""
        return split_path(self.path)

    @property
    def value(self) -> Any:
        """The text read as JSON, else the text itself (:func:`parse_value`)."""
        return parse_value(self.text)


def parse_assignment(item: str) -> Assignment:
    """``"optimizer.lr=0.01"`` -> ``Assignment("optimizer.lr", "0.01")``, the path checked.

    >>> parse_assignment("optimizer.lr=0.01").value
    0.01
    """
    path, sep, text = item.partition("=")
    if not sep or not path.strip():
        raise BadRequest(f"{_short(item)!r} is not PATH=VALUE")
    assignment = Assignment(path.strip(), text)
    assignment.parts  # noqa: B018 - checks the path now (BadPath names the problem)
    return assignment


def assignments_patch(
    assignments: Sequence[Assignment], as_text: Iterable[int] = ()
) -> dict[str, Any]:
    """One nested patch from several assignments (applied atomically by the agent).

    ``as_text``: indexes of assignments to send as the typed text rather than parsed.
    """
    text_indexes = set(as_text)
    patch: dict[str, Any] = {}
    for i, a in enumerate(assignments):
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
        node[parts[-1]] = a.text if i in text_indexes else a.value
    return patch


# --- sending, with the typed text as a second chance ----------------------------------


def _is_retryable_value(value: Any) -> bool:
    """Typed-in text that JSON read as a number or boolean (bool is an int)."""
    return isinstance(value, int | float)


def _string_errors_only(exc: RunctlError) -> list[list[str]] | None:
    """Locations of a rejection made only of "should be a string" errors, else None."""
    if not isinstance(exc, ValidationRejected) or not exc.errors:
        return None
    if any(e.get("type") != "string_type" for e in exc.errors):
        return None
    return [[str(p) for p in e.get("loc", [])] for e in exc.errors]


def _all_rejected(result: Result | Gathered) -> list[RunctlError] | None:
    """For a gathered write that no rank applied: every rank's error."""
    if isinstance(result, Gathered) and result.errors and not result.results:
        return list(result.errors.values())
    return None


async def set_text(
    client: Client, run: str, rank: str, path: str, text: str, **options: Any
) -> Result | Gathered:
    """``client.set`` with ``text`` parsed as JSON, retried as the text for a str field."""
    value = parse_value(text)
    try:
        result = await client.set(run, rank, path, value, **options)
    except ValidationRejected as exc:
        if _is_retryable_value(value) and _string_errors_only(exc) is not None:
            return await client.set(run, rank, path, text, **options)
        raise
    errors = _all_rejected(result)
    if (
        _is_retryable_value(value)
        and errors
        and all(_string_errors_only(e) is not None for e in errors)
    ):
        return await client.set(run, rank, path, text, **options)
    return result


async def patch_assignments(
    client: Client, run: str, rank: str, assignments: Sequence[Assignment], **options: Any
) -> Result | Gathered:
    """Several assignments as one patch; numbers a str field refused go again as text."""
    patch = assignments_patch(assignments)
    try:
        result = await client.patch(run, rank, patch, **options)
        errors = _all_rejected(result)
    except ValidationRejected as exc:
        result, errors = None, [exc]
    if not errors:
        assert result is not None
        return result
    retry = _text_retry(assignments, errors)
    if retry is None:
        if result is None:
            raise errors[0]
        return result
    return await client.patch(run, rank, assignments_patch(assignments, retry), **options)


def _text_retry(assignments: Sequence[Assignment], errors: list[RunctlError]) -> set[int] | None:
    """Which assignments to send as text so every "should be a string" error goes away."""
    wanted: set[int] = set()
    for exc in errors:
        locs = _string_errors_only(exc)
        if locs is None:
            return None
        for loc in locs:
            match = next(
                (
                    i
                    for i, a in enumerate(assignments)
                    if a.parts == loc and _is_retryable_value(a.value)
                ),
                None,
            )
            if match is None:
                return None
            wanted.add(match)
    return wanted or None


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
