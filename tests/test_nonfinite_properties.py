"""Property tests for hostile values: states holding NaN, ±inf, huge integers and unicode
keys, changed through the bus's own encoding (what a client sends: ``wire_value``, then
msgspec), by set, patch and reset.

- Every change applies completely (the state equals what pydantic validates from the
  merged document, read independently with Python's ``json``), or raises a RunctlError
  and leaves the published JSON byte-identical.
- The next valid change always applies, whatever the state holds.
- What is published is strict JSON (msgspec reads it), never ``null`` for a non-finite
  float, and writing it back changes nothing.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import msgspec
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError

from runctl.agent.state import LiveState
from runctl.bus import messages as m
from runctl.bus.errors import RunctlError
from runctl.bus.jsonform import wire_value


class Inner(BaseModel):
    loss: float = 0.0
    history: list[float] = []
    best: float | None = None
    finite: float = Field(1.0, allow_inf_nan=False)
    lr: float = Field(0.1, gt=0)
    anything: Any = None


class State(BaseModel):
    inner: Inner = Inner()
    scores: dict[str, float] = {}
    count: int = 0
    name: str = ""
    either: float | str = 0.0


floats = st.floats(allow_nan=True, allow_infinity=True)
unicode_keys = st.text(min_size=1, max_size=4).filter(lambda k: not k.startswith("_"))
forms = st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "inf", "-inf", "1e999"])
huge = st.integers(min_value=-(2**200), max_value=2**200)
scalars = st.one_of(
    floats, forms, huge, st.integers(-3, 3), st.none(), st.booleans(), st.text(max_size=4)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(unicode_keys, inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = ["inner", "loss", "history", "best", "finite", "lr", "anything", "scores", "count"]
keys = st.one_of(st.sampled_from([*KEYS, "name", "either", "bogus"]), unicode_keys)
patch_values = st.dictionaries(keys, values, max_size=4)
SET_PATHS = [
    "inner.loss",
    "inner.history",
    "inner.history.0",
    "inner.best",
    "inner.finite",
    "inner.lr",
    "inner.anything",
    "scores",
    "count",
    "either",
    "inner",
]
PATCH_PATHS = [None, "inner", "scores"]

initial_states = st.builds(
    State,
    inner=st.builds(
        Inner,
        loss=floats,
        history=st.lists(floats, max_size=3),
        best=st.one_of(st.none(), floats),
        finite=st.floats(allow_nan=False, allow_infinity=False),
        lr=st.floats(min_value=1e-6, max_value=1.0),
        anything=values,
    ),
    scores=st.dictionaries(unicode_keys, floats, max_size=3),
    count=huge,
    name=st.text(max_size=5),
    either=st.one_of(floats, st.text(max_size=3)),
)
changes = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(SET_PATHS), values),
    st.tuples(st.just("patch"), st.sampled_from(PATCH_PATHS), patch_values),
    st.tuples(st.just("reset"), st.none(), st.none()),
)


def over_the_bus(cmd: m.Set | m.Patch) -> Any:
    """What the agent receives from a client: non-finite floats in their JSON form."""
    wire = msgspec.structs.replace(cmd, value=wire_value(cmd.value))
    return m.decode_command("set" if isinstance(cmd, m.Set) else "patch", m.encode(wire))


def same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN, types alike (1 is not 1.0, "NaN" is not NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (a != a and b != b) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _undeclared(node: Any, change: Any) -> bool:
    if isinstance(node, BaseModel) and isinstance(change, dict):
        fields = type(node).model_fields
        return any(
            key not in fields or _undeclared(getattr(node, key), sub) for key, sub in change.items()
        )
    if isinstance(node, list) and isinstance(change, dict):  # a path through an index
        return any(_undeclared(node[int(k)], sub) for k, sub in change.items())
    return False


def expected_after(
    live: dict[str, Any], kind: str, path: str | None, value: Any
) -> tuple[State | None, Any]:
    """The model a change must produce (None: it must be refused), read with Python's
    json (NaN tokens), independently of runctl's own code."""
    data = copy.deepcopy(live)
    parts = path.split(".") if path else []
    change: Any = value
    node: Any = data
    try:
        for part in parts[:-1] if kind == "set" else parts:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if kind == "set":
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        else:
            if not isinstance(node, dict):
                return None, None
            merge(node, value)
    except (KeyError, IndexError, ValueError, TypeError):
        return None, None
    for part in reversed(parts):
        change = {part: change}
    try:
        model = State.model_validate_json(json.dumps(data))
    except (ValidationError, ValueError):
        return None, None
    return (None if _undeclared(model, change) else model), change


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@settings(max_examples=300, deadline=None)
@given(initial=initial_states, steps=st.lists(changes, min_size=1, max_size=4))
def test_changes_apply_completely_or_not_at_all_and_never_block(
    initial: State, steps: list[tuple[str, str | None, Any]]
) -> None:
    start = initial.model_dump(mode="python")
    state = LiveState(initial)
    lr = 0.05
    for kind, path, raw in steps:
        before, version = state.dump_json(), state.version
        live = state.model.model_dump(mode="python")
        try:
            if kind == "set":
                assert path is not None
                cmd = over_the_bus(m.Set(path=path, value=raw))
                want, _ = expected_after(live, kind, path, cmd.value)
                state.set(cmd.path, cmd.value)
            elif kind == "patch":
                cmd = over_the_bus(m.Patch(value=raw, path=path))
                want, _ = expected_after(live, kind, path, cmd.value)
                state.patch(cmd.value, cmd.path)
            else:
                want = State.model_validate(start)
                state.reset()
        except RunctlError as exc:
            event(f"{kind} refused: {exc.code}")
            assert state.dump_json() == before, "a refused change left a trace"
            assert state.version == version
        else:
            event(f"{kind} applied")
            assert want is not None, f"an invalid {kind} was applied: {path} {raw!r}"
            assert same(state.model.model_dump(mode="python"), want.model_dump(mode="python"))
        published = state.dump_json()
        decoded = msgspec.json.decode(published)  # strict JSON
        assert b"NaN" not in published.replace(b'"NaN"', b"")  # never a bare token
        held = state.model.model_dump(mode="python")
        # the next valid change always applies, and keeps every other value as it was
        lr = 0.06 if lr == 0.05 else 0.05
        assert state.set("inner.lr", lr) or state.model.inner.lr == lr
        held["inner"]["lr"] = lr
        assert same(state.model.model_dump(mode="python"), held)
        # what was published, written back, changes no float-typed field
        if not isinstance(decoded["inner"]["anything"], str | dict | list):
            decoded["inner"]["lr"] = lr
            state.patch({k: v for k, v in decoded.items() if k != "either"})
            assert same(state.model.model_dump(mode="python"), held), "a round trip changed it"
