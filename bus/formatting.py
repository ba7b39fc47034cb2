"""Plain-text formatting shared by every surface that prints for people: durations, "ago",
tables, cut-off text. Pure functions (no I/O), so protocol modules may use them too.

>>> print(render_table([("RANK", "STATUS"), ("0", "alive"), ("12", "stale")]))
RANK  STATUS
0     alive
12    stale
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ago", "cut", "format_bytes", "format_duration", "render_table"]


def format_duration(seconds: float) -> str:
    """A duration in the unit that reads best.

    >>> [format_duration(s) for s in (0.25, 42, 600, 9000)]
    ['250ms', '42.0s', '10.0m', '2.5h']
    """
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def format_bytes(size: int) -> str:
    """A size for people: ``512 B``, ``1.5 KiB``, ``2.0 MiB``, ``3.2 GiB``.

    >>> format_bytes(2 * 1024 * 1024)
    '2.0 MiB'
    """
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def ago(seconds: float) -> str:
    """How long ago, from an age in seconds (a negative age, from clock skew, is 0).

    >>> ago(90)
    '90.0s ago'
    """
    return f"{format_duration(max(0.0, seconds))} ago"


def cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in ``...`` when cut.

    >>> cut("abcdefgh", 6)
    'abc...'
    """
    return text if len(text) <= width else text[: width - 3] + "..."


def render_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
