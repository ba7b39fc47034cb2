"""Canonical JSON and step hashes: pinned, so a step logged today is found by any later
process, Python version or machine (bus/canonical.py documents the form)."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from runctl.bus.canonical import Hashed, canonical_json, digest, hashed, key_digest, normalize


@pytest.mark.parametrize(
    ("value", "text", "hash_"),
    [
        ({"b": 1, "a": [1.0, 0.1, "é"], "_x": 5}, '{"a":[1,0.1,"é"],"b":1}', "affc435a1e96bd45"),
        (
            {"lr": 1e-7, "big": 1e16, "n": None, "t": True},
            '{"big":1e+16,"lr":1e-07,"n":null,"t":true}',
            "a2b7ffbcaff11d9b",
        ),
        (5, "5", "ef2d127de37b942b"),
        ("shard-3", '"shard-3"', "0f72271d9d027fc6"),
        (None, "null", "74234e98afe7498f"),
        ({"nested": {"_seed": 1, "k": {2, 1}}}, '{"nested":{"k":[1,2]}}', "d0eb3f6229181d0c"),
    ],
)
def test_golden_canonical_text_and_hash(value: object, text: str, hash_: str) -> None:
    assert canonical_json(value) == text
    assert digest(text) == hash_
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == hash_  # the documented recipe
    assert hashed(value).hash == hash_


def test_key_fast_paths_agree_with_the_general_form() -> None:
    for key in (0, 7, -3, 10**30, "a", "é ü", "", None):
        assert key_digest(key)[1] == hashed(key).hash
    assert key_digest(True)[1] != key_digest(1)[1]  # JSON true is not 1


def test_ignore_prefix_is_configurable_and_applies_at_every_depth() -> None:
    cfg = {"lr": 0.1, "_workers": 8, "opt": {"_device": "cuda:0", "beta": 0.9}}
    assert hashed(cfg).hash == hashed({"lr": 0.1, "opt": {"beta": 0.9}}).hash
    assert hashed(cfg, ignore_prefix=None).hash != hashed(cfg).hash
    assert normalize(cfg, ignore_prefix="o") == {"lr": 0.1, "_workers": 8}


def test_numbers_that_mean_the_same_hash_the_same() -> None:
    assert hashed({"epochs": 10.0}).hash == hashed({"epochs": 10}).hash
    assert hashed({"x": -0.0}).hash == hashed({"x": 0}).hash
    assert hashed({"lr": 0.1}).hash != hashed({"lr": 0.10000000000000002}).hash
    assert hashed((1, 2)).hash == hashed([1, 2]).hash


def test_rich_values_are_converted_first() -> None:
    class Kind(enum.Enum):
        SGD = "sgd"

    class Opt(BaseModel):
        kind: str = "sgd"
        lr: float = 0.1

    @dataclasses.dataclass
    class Data:
        path: PurePosixPath
        kind: Kind

    assert normalize({"opt": Opt(), "data": Data(PurePosixPath("/d"), Kind.SGD)}) == {
        "opt": {"kind": "sgd", "lr": 0.1},
        "data": {"path": "/d", "kind": "sgd"},
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"lr": float("nan")}, "at 'lr' is nan"),
        ({"a": [1, float("inf")]}, r"at 'a\[1\]' is inf"),
        ({1: "x"}, "keys must be strings"),
        ({"fn": print}, "at 'fn' is a builtin_function_or_method"),
    ],
)
def test_values_without_a_canonical_form_are_refused_by_name(value: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        hashed(value)


def test_hashed_passes_through() -> None:
    h = hashed({"a": 1})
    assert isinstance(h, Hashed) and hashed(h) is h


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_canonical_text_is_a_fixed_point(value: object) -> None:
    """Reading the canonical text back and writing it again changes nothing, whatever the
    key order: the hash depends on the value only."""
    import json

    text = canonical_json(value, ignore_prefix=None)
    assert canonical_json(json.loads(text), ignore_prefix=None) == text
    if isinstance(value, dict):
        shuffled = dict(reversed(list(value.items())))
        assert canonical_json(shuffled, ignore_prefix=None) == text
