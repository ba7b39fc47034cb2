"""The "Distributed runs" snippets (docs/distributed.md, and the README once merged there)
are the code the tests run: each ```python block after a ``<!-- snippet: FILE -->`` marker
must appear in FILE, in order, line for line (a ``...`` line skips any number of lines; a
block may sit deeper in FILE than in the docs). tests/test_torchrun.py and
tests/test_lightning.py run those files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

MARKED = re.compile(r"<!-- snippet: (?P<file>\S+) -->\s*```python\n(?P<code>.*?)```", re.S)
DOCS = [ROOT / "docs" / "distributed.md", ROOT / "README.md"]


def snippets(doc: Path) -> list[tuple[str, str]]:
    return [(m["file"], m["code"]) for m in MARKED.finditer(doc.read_text())]


def segments(code: str) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for line in code.splitlines():
        if line.strip() == "...":
            parts.append([])
        else:
            parts[-1].append(line.rstrip())
    return [p for p in parts if p]


def find(segment: list[str], lines: list[str], start: int) -> int:
    """Index just past ``segment`` in ``lines`` (at or after ``start``), else -1."""
    first = segment[0]
    for at in range(start, len(lines) - len(segment) + 1):
        line = lines[at]
        if not line.endswith(first.lstrip()) or not line.strip():
            continue
        extra = line[: len(line) - len(first.lstrip())]
        base = first[: len(first) - len(first.lstrip())]
        if not extra.startswith(base) or extra.strip():
            continue
        indent = extra[len(base) :]
        if all(
            lines[at + i] == (indent + want if want else "")
            or (not want and not lines[at + i].strip())
            for i, want in enumerate(segment)
        ):
            return at + len(segment)
    return -1


def located(file: str, code: str) -> bool:
    lines = [line.rstrip() for line in (ROOT / file).read_text().splitlines()]
    at = 0
    for segment in segments(code):
        at = find(segment, lines, at)
        if at < 0:
            return False
    return True


def test_the_distributed_docs_have_both_snippets() -> None:
    files = {file for file, _ in snippets(DOCS[0])}
    assert files == {"examples/torchrun_train.py", "examples/lightning_train.py"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_snippet_is_code_a_test_runs(doc: Path) -> None:
    found = snippets(doc)
    if doc.name == "README.md" and "## Distributed runs" not in doc.read_text():
        pytest.skip("the section is not merged into the README yet")
    assert found, f"no marked snippet in {doc.name}"
    for file, code in found:
        assert located(file, code), f"{doc.name}: snippet not found in {file}:\n{code}"


def test_the_checker_notices_a_changed_line() -> None:
    file, code = snippets(DOCS[0])[0]
    assert located(file, code)
    assert not located(file, code.replace("ctl.sync(step)", "ctl.sync(step + 1)", 1))
    assert not located(file, "for epoch in range(3):\n")
