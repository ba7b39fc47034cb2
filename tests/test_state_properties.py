"""Property tests: a change is applied completely or not at all.

For random patches and sets (known and unknown keys, right and wrong types, nested objects,
lists) LiveState either applies the change so the state equals what pydantic validates from
the merged document (so every patched leaf holds the validated value), or raises a
RunctlError and leaves ``model_dump_json()`` byte-identical. Never any other exception.

The oracle is independent of agent.state: its own merge, pydantic's own validation, and a
walk of the validated model for keys that are not declared fields.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Literal

from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from runctl.agent.state import LiveState
from runctl.bus.errors import RunctlError


class Sched(BaseModel):
    kind: Literal["cos", "step"] = "cos"
    warmup: int = Field(0, ge=0)


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)
    momentum: float = 0.9
    sched: Sched = Sched()


class Layer(BaseModel):
    width: int = Field(64, gt=0)
    act: str = "relu"


class Cfg(BaseModel):
    epochs: int = Field(3, gt=0)
    mode: Literal["train", "eval"] = "train"
    seed: int | None = None
    value: int | str = 0
    name: str = "x"
    opt: Opt = Opt()
    layers: list[Layer] = [Layer(), Layer(width=32)]
    tags: dict[str, int] = {"a": 1}
    batch_size: int = Field(32, alias="batchSize")
    lo: int = 0
    hi: int = 10

    @field_validator("name")
    @classmethod
    def _normalise(cls, v: str) -> str:
        return v.strip().lower()

    @model_validator(mode="after")
    def _ordered(self) -> Cfg:
        if self.lo > self.hi:
            raise ValueError("lo must be <= hi")
        return self


KNOWN_KEYS = [
    "epochs",
    "mode",
    "seed",
    "value",
    "name",
    "opt",
    "lr",
    "momentum",
    "sched",
    "kind",
    "warmup",
    "layers",
    "width",
    "act",
    "tags",
    "batchSize",
    "batch_size",
    "lo",
    "hi",
    "a",
]
ODD_KEYS = ["bogus", "_secret", "__dict__", "__class__", "model_config", "LIMIT", ""]

keys = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(ODD_KEYS),
    st.text(max_size=6),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["train", "eval", "cos", "step", "relu", "7", " Mixed Case ", ""]),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
random_patches = st.dictionaries(keys, json_values, max_size=5)


def _typed(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with a few of the model's own keys, each with a mostly well-typed value."""
    return st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=4).flatmap(
        lambda chosen: st.fixed_dictionaries({k: fields[k] for k in chosen})
    )


small_ints = st.integers(min_value=-2, max_value=60)
sched_patch = _typed(
    {
        "kind": st.sampled_from(["cos", "step", "Cos", "linear"]),
        "warmup": small_ints,
    }
)
opt_patch = _typed(
    {
        "lr": st.floats(min_value=-0.5, max_value=5, allow_nan=False),
        "momentum": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.just("0.5")),
        "sched": sched_patch,
    }
)
layer_patch = _typed({"width": small_ints, "act": st.text(max_size=5)})
root_patch = _typed(
    {
        "epochs": small_ints,
        "mode": st.sampled_from(["train", "eval", "TRAIN", "test"]),
        "seed": st.one_of(st.none(), small_ints, st.just("3"), st.just(1.5)),
        "value": st.one_of(small_ints, st.text(max_size=4)),
        "name": st.text(max_size=8),
        "opt": opt_patch,
        "layers": st.lists(layer_patch, max_size=3),
        "tags": st.dictionaries(st.text(max_size=4), small_ints, max_size=3),
        "batchSize": small_ints,
        "batch_size": small_ints,
        "lo": st.integers(min_value=-5, max_value=15),
        "hi": st.integers(min_value=-5, max_value=15),
    }
)
typed_patches = st.one_of(
    st.tuples(st.none(), root_patch),
    st.tuples(st.just("opt"), opt_patch),
    st.tuples(st.just("opt.sched"), sched_patch),
    st.tuples(st.sampled_from(["layers.0", "layers.1"]), layer_patch),
    st.tuples(st.just("tags"), st.dictionaries(st.text(max_size=4), small_ints, max_size=3)),
)


@st.composite
def _noisy(draw: st.DrawFn) -> tuple[str | None, dict[str, Any]]:
    """A well-typed patch with one random key or value planted at a random depth."""
    path, patch = draw(typed_patches)
    patch = copy.deepcopy(patch)
    objects = [patch]
    stack: list[Any] = [patch]
    while stack:
        node = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict):
                objects.append(child)
            if isinstance(child, dict | list):
                stack.append(child)
    target = draw(st.sampled_from(objects))
    target[draw(st.one_of(st.sampled_from(ODD_KEYS), keys))] = draw(json_values)
    return path, patch


patches = st.one_of(
    typed_patches, _noisy(), st.tuples(st.sampled_from([None, "opt"]), random_patches)
)
PATCH_PATHS = [None, None, "opt", "opt.sched", "layers.0", "layers.1", "tags"]
SET_PATHS = [
    "epochs",
    "mode",
    "seed",
    "value",
    "name",
    "opt",
    "opt.lr",
    "opt.sched",
    "opt.sched.kind",
    "opt.sched.warmup",
    "layers",
    "layers.0",
    "layers.1.width",
    "tags",
    "tags.a",
    "tags.new",
    "batch_size",
    "lo",
    "hi",
]
SET_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "opt": opt_patch,
    "opt.sched": sched_patch,
    "layers": st.lists(layer_patch, max_size=3),
    "layers.0": layer_patch,
    "tags": st.dictionaries(st.text(max_size=4), small_ints),
}


# --- the oracle -----------------------------------------------------------------------------


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _walk(data: Any, parts: list[str]) -> Any:
    for part in parts:
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _undeclared(node: Any, change: Any) -> bool:
    """Does ``change`` name a key that is not a declared field of a model inside ``node``?"""
    if isinstance(node, BaseModel) and isinstance(change, dict):
        fields = type(node).model_fields
        by_key = {**{f.alias: n for n, f in fields.items() if f.alias}, **{n: n for n in fields}}
        return any(
            key not in by_key or _undeclared(getattr(node, by_key[key]), sub)
            for key, sub in change.items()
        )
    if isinstance(node, list) and isinstance(change, list):
        return any(_undeclared(n, c) for n, c in zip(node, change, strict=False))
    if isinstance(node, dict) and isinstance(change, dict):
        return any(key in node and _undeclared(node[key], sub) for key, sub in change.items())
    return False


def _expected(data: dict[str, Any], parts: list[str], change: Any) -> Cfg | None:
    """The model the change must produce, or None if it must be rejected."""
    try:
        new = Cfg.model_validate_json(json.dumps(data), by_alias=True, by_name=True)
    except ValidationError:
        return None
    if _undeclared(_walk_model(new, parts), change):
        return None
    return new


def _walk_model(model: Any, parts: list[str]) -> Any:
    for part in parts:
        model = (
            model[int(part)]
            if isinstance(model, list)
            else (model[part] if isinstance(model, dict) else getattr(model, part))
        )
    return model


def _check(state: LiveState[Cfg], expected: Cfg | None, apply: Any) -> None:
    before, version = state.model.model_dump_json(), state.version
    held_opt, held_layers = state.model.opt, state.model.layers
    try:
        changed = apply()
    except RunctlError as exc:
        event(f"rejected: {exc.code}")
        assert expected is None, "a valid change was refused"
        assert state.model.model_dump_json() == before
        assert state.version == version
        return
    assert expected is not None, "an invalid change was applied"
    after = state.model.model_dump_json()
    event("applied, changed" if after != before else "applied, no change")
    assert after == expected.model_dump_json()
    assert changed == (after != before)
    assert state.version == version + (1 if changed else 0)
    assert state.model.opt is held_opt and state.model.layers is held_layers


# --- the properties ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(change=patches)
def test_patch_applies_completely_or_not_at_all(change: tuple[str | None, dict[str, Any]]) -> None:
    path, patch = change
    state = LiveState(Cfg())
    parts = path.split(".") if path else []
    data = state.model.model_dump(mode="json")
    _merge(_walk(data, parts), patch)
    _check(state, _expected(data, parts, patch), lambda: state.patch(patch, path))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), path=st.sampled_from(SET_PATHS))
def test_set_applies_completely_or_not_at_all(data: st.DataObject, path: str) -> None:
    value = data.draw(st.one_of(SET_VALUES.get(path, small_ints), json_values), label="value")
    state = LiveState(Cfg())
    parts = path.split(".")
    doc = state.model.model_dump(mode="json")
    parent = _walk(doc, parts[:-1])
    if isinstance(parent, list):
        parent[int(parts[-1])] = copy.deepcopy(value)
    else:
        parent[parts[-1]] = copy.deepcopy(value)
    _check(state, _expected(doc, parts, value), lambda: state.set(path, value))


@settings(max_examples=100, deadline=None)
@given(changes=st.lists(patches, max_size=5))
def test_a_sequence_of_patches_then_reset_returns_to_the_start(
    changes: list[tuple[str | None, dict[str, Any]]],
) -> None:
    state = LiveState(Cfg())
    initial = state.model.model_dump_json()
    for path, patch in changes:
        before = state.model.model_dump_json()
        try:
            state.patch(patch, path)
        except RunctlError:
            assert state.model.model_dump_json() == before
    state.reset()
    assert state.model.model_dump_json() == initial
