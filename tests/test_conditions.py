"""The condition language of ``runctl watch --when``: what it answers, what it refuses,
and that no input makes it raise anything but a clear BadRequest (or run code)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runctl.bus.conditions import MAX_DEPTH, parse
from runctl.bus.errors import BadRequest

STATE: dict[str, Any] = {
    "loss": 12.5,
    "step": 300,
    "mode": "train",
    "frozen": False,
    "optimizer": {"lr": 1e-6, "kind": "adam"},
    "layers": [{"width": 128}, {"width": 64}],
    "weights": {"enc-1": 0.5},
    "nan_loss": None,  # pydantic writes a NaN float as null
    "inf_loss": "Infinity",
    "nan_str": "NaN",
    "maybe": None,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("loss > 10", True),
        ("loss > 100", False),
        ("loss >= 12.5 and step == 300", True),
        ("10 < loss < 20", True),
        ("10 < loss < 11", False),
        ("isnan(loss)", False),
        ("isnan(nan_loss)", True),
        ("isnan(nan_str)", True),
        ("isinf(inf_loss) and inf_loss > 1e308", True),
        ("isfinite(loss) and not isfinite(inf_loss)", True),
        ("optimizer.lr < 1e-5", True),
        ("optimizer.kind == 'adam' && !frozen", True),
        ('mode == "train" || loss > 1000', True),
        ("layers[0].width == 128 and layers[-1].width == 64", True),
        ('weights["enc-1"] * 2 == 1', True),
        ("len(layers) == 2 and len(mode) == 5", True),
        ("max(loss, step) == 300 and min(1, 2, -3) == -3", True),
        ("abs(-loss) == loss", True),
        ("step % 100 == 0 and step / 3 == 100 and 2 ** 10 == 1024", True),
        ("-(loss - 2.5) == -10", True),
        ("(loss + 1) * 2 == 27", True),
        ("maybe == null and maybe == None", True),
        ("frozen == false", True),
        ("1 == 1.0 and true != 1", True),
        ("nan_loss > 10", None),  # unknown: null is not a number
        ("missing > 1", None),  # unknown: no such field
        ("missing > 1 or loss > 10", True),  # three-valued logic
        ("missing > 1 and loss > 100", False),
        ("missing > 1 and loss > 10", None),
        ("not missing", None),
        ("mode > 1", None),  # a string is no number
        ("loss / 0 > 1", None),
        ("optimizer.lr.x == 1", None),
        ("layers[5].width > 1", None),
        ("loss", True),
        ("step - 300", False),
        ("10 ** 10 ** 10 > 1", True),  # a float overflow is infinity, not a hang
    ],
)
def test_evaluates(text: str, expected: bool | None) -> None:
    assert parse(text).evaluate(STATE) is expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("loss >> 1", "column 7"),
        ("loss >", "found the end"),
        ("(loss > 1", "expected ')'"),
        ("loss > 1)", "expected an operator or the end"),
        ("__import__('os')", "unknown function '__import__'"),
        ("loss.__class__ > 1", None),  # a path into the JSON: parsed, and unknown
        ("open('x')", "unknown function 'open'"),
        ("isnan()", "expected a value"),
        ("isnan(1, 2)", "takes 1 argument"),
        ("layers[x]", "integer index or a quoted key"),
        ("loss = 1", "unexpected '='"),
        ("loss > 1 ; 1", "unexpected ';'"),
        ("a.", "field name after '.'"),
        ("x" * 1001, "longer than 1000"),
        ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), "nested deeper"),
        ("-" * (MAX_DEPTH + 1) + "1", "nested deeper"),
    ],
)
def test_refuses_with_a_clear_message(text: str, problem: str | None) -> None:
    if problem is None:
        assert parse(text).evaluate(STATE) is None
        return
    with pytest.raises(BadRequest, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse(text)


def test_fields_and_missing() -> None:
    cond = parse("isnan(loss) or optimizer.lr > 1 or typo > 3")
    assert cond.fields == {"loss", "optimizer", "typo"}
    assert cond.missing(STATE) == ["typo"]
    assert str(cond) == "isnan(loss) or optimizer.lr > 1 or typo > 3"


def test_any_json_state_never_raises() -> None:
    cond = parse("loss > 10 and layers[0].width < 3 or isnan(loss)")
    for state in (None, 1, "x", [], [1], {"loss": [1]}, {"layers": {"0": 1}}, {"loss": math.nan}):
        assert cond.evaluate(state) in (True, False, None)


_alphabet = st.sampled_from(
    [*"abxyz_0123456789.+-*/%<>=!&|()[],'\" ", "and ", "or ", "not ", "isnan", "**"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_alphabet, max_size=40).map("".join))
def test_arbitrary_text_parses_or_is_a_bad_request(text: str) -> None:
    try:
        cond = parse(text)
    except BadRequest:
        return
    for state in ({"a": 1, "b": [1, 2], "x": {"y": "z"}, "z": "NaN"}, {}, None):
        assert cond.evaluate(state) in (True, False, None)
