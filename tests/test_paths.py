"""Dotted paths into published JSON state (what the client resolves registry reads with)."""

from __future__ import annotations

from typing import Any

import pytest

from runctl.bus.errors import BadPath
from runctl.bus.paths import MAX_DEPTH, MAX_PATH_LENGTH, resolve, split_path

DATA: dict[str, Any] = {
    "optimizer": {"lr": 0.1, "betas": [0.9, 0.999]},
    "layers": [{"width": 64}, {"width": 32}],
    "tags": {"a": 1},
    "seed": None,
}


def test_split_path() -> None:
    assert split_path("optimizer.lr") == ["optimizer", "lr"]
    assert split_path("layers.0.width") == ["layers", "0", "width"]
    assert split_path("") == []
    assert split_path(".") == []


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("a..b", "empty segment"),
        ("a.", "empty segment"),
        (".a", "empty segment"),
        ("_private", "private"),
        ("a.__dict__", "private"),
        ("a.__class__.__init__", "private"),
        ("x" * (MAX_PATH_LENGTH + 1), "longer than"),
        (".".join(["a"] * (MAX_DEPTH + 1)), "deeper than"),
    ],
)
def test_split_path_refuses(path: str, problem: str) -> None:
    with pytest.raises(BadPath) as info:
        split_path(path)
    assert problem in info.value.problem
    assert info.value.path == path
    assert len(str(info.value)) < 400  # a long path is not echoed whole


def test_resolve() -> None:
    assert resolve(DATA, None) is DATA
    assert resolve(DATA, "") is DATA
    assert resolve(DATA, "optimizer.lr") == 0.1
    assert resolve(DATA, "optimizer") == {"lr": 0.1, "betas": [0.9, 0.999]}
    assert resolve(DATA, "optimizer.betas.1") == 0.999
    assert resolve(DATA, "layers.0.width") == 64
    assert resolve(DATA, "layers.-1.width") == 32
    assert resolve(DATA, "seed") is None


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("nope", "no field 'nope' in the state"),
        ("optimizer.nope", "no field 'nope' in optimizer"),
        ("layers.2", "out of range"),
        ("layers.-3", "out of range"),
        ("layers.x", "not a list index"),
        ("optimizer.lr.x", "optimizer.lr is a float"),
        ("seed.x", "seed is a NoneType"),
    ],
)
def test_resolve_refuses(path: str, problem: str) -> None:
    with pytest.raises(BadPath) as info:
        resolve(DATA, path)
    assert problem in str(info.value)
