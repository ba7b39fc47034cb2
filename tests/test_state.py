"""LiveState: validated, all-or-nothing changes applied in place to the program's own objects.

Pure (no bus): every test here inspects the live pydantic objects directly.
"""

from __future__ import annotations

import math
import threading
from typing import Any, ClassVar, Literal

import pytest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    computed_field,
    field_validator,
    model_validator,
)

from runctl.agent.state import LiveState
from runctl.bus.errors import BadPath, BadRequest, RunctlError, UnknownPath, ValidationRejected


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

    LIMIT: ClassVar[int] = 5
    _cache: str = PrivateAttr("hidden")

    @field_validator("name")
    @classmethod
    def _normalise(cls, v: str) -> str:
        return v.strip().lower()

    @model_validator(mode="after")
    def _ordered(self) -> Cfg:
        if self.lo > self.hi:
            raise ValueError("lo must be <= hi")
        return self

    @property
    def double_epochs(self) -> int:
        return self.epochs * 2

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total(self) -> int:
        return self.epochs * 10


def live() -> LiveState[Cfg]:
    return LiveState(Cfg())


def dump(state: LiveState[Any]) -> str:
    text: str = state.model.model_dump_json()
    return text


def rejected(state: LiveState[Any], change: Any, exc: type[RunctlError]) -> RunctlError:
    """Run ``change``; it must raise ``exc`` and leave the state byte-identical."""
    before, version = dump(state), state.version
    with pytest.raises(exc) as info:
        change()
    assert dump(state) == before
    assert state.version == version
    return info.value


# --- set --------------------------------------------------------------------------------


def test_set_leaf_by_dotted_path() -> None:
    s = live()
    assert s.set("opt.lr", 0.5) is True
    assert s.model.opt.lr == 0.5
    assert s.set("opt.sched.kind", "step") is True
    assert s.model.opt.sched.kind == "step"
    assert s.version == 2


def test_set_whole_subtree_replaces_it_and_keeps_identity() -> None:
    s = live()
    opt, sched = s.model.opt, s.model.opt.sched
    s.set("opt.momentum", 0.5)
    assert s.set("opt", {"lr": 0.2, "sched": {"kind": "step"}}) is True
    # set replaces: what the value leaves out is back to its default
    assert s.model.opt.model_dump() == {
        "lr": 0.2,
        "momentum": 0.9,
        "sched": {"kind": "step", "warmup": 0},
    }
    assert s.model.opt is opt and s.model.opt.sched is sched


def test_set_into_a_list_index() -> None:
    s = live()
    layer1 = s.model.layers[1]
    assert s.set("layers.1.width", 5) is True
    assert s.model.layers[1].width == 5 and s.model.layers[1] is layer1
    assert s.set("layers.0", {"width": 7}) is True
    assert s.model.layers[0].model_dump() == {"width": 7, "act": "relu"}
    e = rejected(s, lambda: s.set("layers.2", {"width": 1}), BadPath)
    assert "out of range" in str(e)
    e = rejected(s, lambda: s.set("layers.x", {"width": 1}), BadPath)
    assert "index" in str(e)


def test_set_a_new_dict_key_and_validate_it() -> None:
    s = live()
    tags = s.model.tags
    assert s.set("tags.b", 2) is True
    assert s.model.tags == {"a": 1, "b": 2} and s.model.tags is tags
    e = rejected(s, lambda: s.set("tags.c", "not an int"), ValidationRejected)
    assert isinstance(e, ValidationRejected) and e.errors[0]["loc"] == ["tags", "c"]
    # only the last segment may be new
    rejected(s, lambda: s.set("tags.new.deeper", 1), BadPath)


def test_set_the_whole_state() -> None:
    s = live()
    assert s.set("", {"epochs": 9, "opt": {"lr": 0.3}}) is True
    assert s.model.epochs == 9 and s.model.opt.lr == 0.3
    rejected(s, lambda: s.set("", [1, 2]), BadRequest)


def test_set_undeclared_field_is_a_bad_path() -> None:
    s = live()
    e = rejected(s, lambda: s.set("opt.bogus", 1), BadPath)
    assert "'bogus' is not a declared field of opt" in str(e)
    rejected(s, lambda: s.set("bogus", 1), BadPath)
    rejected(s, lambda: s.set("opt.lr.x", 1), BadPath)


def test_set_a_subtree_with_an_unknown_key_is_rejected() -> None:
    s = live()
    e = rejected(s, lambda: s.set("opt", {"lr": 0.2, "bogus": 1}), ValidationRejected)
    assert isinstance(e, ValidationRejected)
    assert e.errors[0]["type"] == "extra_forbidden" and e.errors[0]["loc"] == ["opt", "bogus"]


def test_set_a_list_item_with_an_unknown_key_is_rejected() -> None:
    s = live()
    e = rejected(s, lambda: s.set("layers.1", {"width": 5, "bogus": 1}), ValidationRejected)
    assert isinstance(e, ValidationRejected) and e.errors[0]["type"] == "extra_forbidden"
    e = rejected(s, lambda: s.set("layers", [{"width": 5, "bogus": 1}]), ValidationRejected)
    assert isinstance(e, ValidationRejected) and e.errors[0]["loc"] == ["layers", 0, "bogus"]


# --- patch ------------------------------------------------------------------------------


def test_patch_partial_nested_keeps_siblings() -> None:
    s = live()
    # every sibling away from its default first: a shallow merge (or a rebuild from the
    # defaults) would bring a default back
    s.patch({"opt": {"lr": 0.7, "momentum": 0.5, "sched": {"kind": "step"}}})
    assert s.patch({"opt": {"sched": {"warmup": 5}}}) is True
    assert s.model.opt.model_dump() == {
        "lr": 0.7,
        "momentum": 0.5,
        "sched": {"kind": "step", "warmup": 5},
    }
    assert s.patch({"warmup": 6, "kind": "step"}, path="opt.sched") is True
    assert s.model.opt.sched.model_dump() == {"kind": "step", "warmup": 6}
    assert s.model.opt.lr == 0.7


def test_patch_lists_replace_and_dicts_merge() -> None:
    s = live()
    assert s.patch({"layers": [{"width": 1}], "tags": {"b": 2}}) is True
    assert [layer.width for layer in s.model.layers] == [1]
    assert s.model.tags == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("patch", "path", "loc"),
    [
        ({"bogus": 1}, None, ["bogus"]),
        ({"epochs": 5, "bogus": 1}, None, ["bogus"]),  # the valid part is not applied either
        ({"opt": {"lr": 0.5, "bogus": 1}}, None, ["opt", "bogus"]),
        ({"opt": {"sched": {"warmup": 1, "bogus": 1}}}, None, ["opt", "sched", "bogus"]),
        ({"layers": [{"width": 1}, {"width": 2, "bogus": 1}]}, None, ["layers", 1, "bogus"]),
        ({"bogus": 1}, "opt", ["opt", "bogus"]),
        ({"bogus": 1}, "layers.0", None),
        ({"total": 5}, None, ["total"]),  # a computed field is not an input
        ({"_cache": "x"}, None, ["_cache"]),
        ({"LIMIT": 7}, None, ["LIMIT"]),
    ],
)
def test_patch_with_unknown_field_is_rejected_and_nothing_changes(
    patch: dict[str, Any], path: str | None, loc: list[Any] | None
) -> None:
    s = live()
    e = rejected(s, lambda: s.patch(patch, path), ValidationRejected)
    assert isinstance(e, ValidationRejected)
    assert e.errors and all(err["type"] == "extra_forbidden" for err in e.errors)
    if loc is not None:
        assert e.errors[0]["loc"] == loc
    assert s.model._cache == "hidden"
    assert Cfg.LIMIT == 5


def test_patch_must_be_an_object_and_target_an_object() -> None:
    s = live()
    rejected(s, lambda: s.patch([1], None), BadRequest)  # type: ignore[arg-type]
    rejected(s, lambda: s.patch({"a": 1}, "opt.lr"), BadPath)


def test_alias_and_field_name_are_both_accepted_in_a_patch() -> None:
    s = live()
    assert s.patch({"batchSize": 64}) is True
    assert s.model.batch_size == 64
    assert s.patch({"batch_size": 128}) is True
    assert s.model.batch_size == 128
    # paths name fields
    assert s.set("batch_size", 256) is True
    assert s.model.batch_size == 256


# --- validation ---------------------------------------------------------------------------


def test_invalid_value_is_rejected_with_pydantics_errors_and_nothing_changes() -> None:
    s = live()
    s.set("opt.lr", 0.5)
    e = rejected(s, lambda: s.patch({"epochs": 7, "opt": {"lr": -1}}), ValidationRejected)
    assert isinstance(e, ValidationRejected)
    assert e.errors == [
        {
            "type": "greater_than",
            "loc": ["opt", "lr"],
            "msg": "Input should be greater than 0",
            "input": -1,
            "ctx": {"gt": 0},
        }
    ]
    assert s.model.epochs == 3  # the valid half was not applied
    assert "1 validation error" in str(e)


def test_several_errors_are_all_reported() -> None:
    s = live()
    e = rejected(s, lambda: s.patch({"epochs": 0, "mode": "x", "seed": "y"}), ValidationRejected)
    assert isinstance(e, ValidationRejected)
    assert {tuple(err["loc"]) for err in e.errors} == {("epochs",), ("mode",), ("seed",)}
    assert {err["type"] for err in e.errors} == {"greater_than", "literal_error", "int_parsing"}


def test_literal_rejects_any_other_string() -> None:
    s = live()
    for bad in ("TRAIN", "train ", "test", ""):
        e = rejected(s, lambda bad=bad: s.set("mode", bad), ValidationRejected)
        assert isinstance(e, ValidationRejected) and e.errors[0]["type"] == "literal_error"
    assert s.set("mode", "eval") is True and s.model.mode == "eval"


def test_optional_int_none_to_int_and_back() -> None:
    s = live()
    assert s.set("seed", 42) is True and s.model.seed == 42
    assert s.patch({"seed": None}) is True and s.model.seed is None
    rejected(s, lambda: s.set("seed", 1.5), ValidationRejected)


def test_union_field() -> None:
    s = live()
    assert s.set("value", "abc") is True and s.get("value") == b'"abc"'
    assert s.set("value", 5) is True and s.get("value") == b"5"
    assert isinstance(s.model.value, int)
    rejected(s, lambda: s.set("value", [1]), ValidationRejected)


def test_field_validator_transforms_the_value() -> None:
    s = live()
    assert s.set("name", "  HeLLo ") is True
    assert s.model.name == "hello"
    assert s.set("name", "HELLO") is False  # validates to the same value: no change


def test_model_validator_after_checks_across_fields() -> None:
    s = live()
    e = rejected(s, lambda: s.set("lo", 11), ValidationRejected)
    assert isinstance(e, ValidationRejected)
    assert "lo must be <= hi" in e.errors[0]["msg"]
    assert len(str(e.errors[0]["input"])) < 300  # the whole state is not echoed back
    # both ends in one patch: consistent, accepted
    assert s.patch({"lo": 11, "hi": 20}) is True
    assert (s.model.lo, s.model.hi) == (11, 20)


# --- versions -------------------------------------------------------------------------------


def test_version_bumps_only_on_a_real_change() -> None:
    s = live()
    assert s.set("epochs", 3) is False
    assert s.patch({"opt": {"lr": 0.1}}) is False
    assert s.patch({}) is False
    assert s.reset() is False
    assert s.version == 0
    assert s.set("epochs", 4) is True
    assert s.version == 1
    assert s.set("epochs", 4) is False
    assert s.version == 1
    assert s.set("opt.lr", 1) is True  # 1 validates to 1.0: a change from 0.1
    assert s.set("opt.lr", 1.0) is False
    assert s.version == 2


def test_program_changes_are_noticed_by_poll_changed() -> None:
    s = live()
    assert s.poll_changed() is None
    s.model.epochs = 8  # the program itself, no validation
    noticed = s.poll_changed()
    assert noticed is not None and b'"epochs":8' in noticed
    assert s.version == 1
    assert s.poll_changed() is None
    s.set("epochs", 9)  # a change through runctl, then the program's own again: each counts
    s.model.epochs = 10
    assert s.poll_changed() is not None and s.version == 3


def test_a_heartbeat_poll_serialises_the_state_once(monkeypatch: pytest.MonkeyPatch) -> None:
    s = live()
    dumps = 0
    dump_json = s.dump_json

    def counted() -> bytes:
        nonlocal dumps
        dumps += 1
        return dump_json()

    monkeypatch.setattr(s, "dump_json", counted)
    assert s.poll() == (dump_json(), False)  # unchanged: the bytes all the same, for the beat
    s.model.epochs = 8
    dumped, changed = s.poll()
    assert changed and b'"epochs":8' in dumped and s.version == 1
    assert dumps == 2


# --- references held by the program ---------------------------------------------------------


def test_held_references_see_new_values() -> None:
    s = live()
    cfg = s.model
    opt, sched = cfg.opt, cfg.opt.sched
    layers, layer0, tags = cfg.layers, cfg.layers[0], cfg.tags
    s.patch(
        {
            "opt": {"lr": 0.01, "sched": {"warmup": 9}},
            "layers": [{"width": 3}, {}],
            "tags": {"z": 26},
        }
    )
    assert opt.lr == 0.01 and sched.warmup == 9
    assert layer0.width == 3 and layers[1].width == 64
    assert tags == {"a": 1, "z": 26}
    assert cfg.opt is opt and cfg.opt.sched is sched
    assert cfg.layers is layers and cfg.layers[0] is layer0 and cfg.tags is tags
    s.set("layers", [{"width": 11}])  # another length: same list object, new content
    assert cfg.layers is layers and [layer.width for layer in layers] == [11]


# --- reset ----------------------------------------------------------------------------------


def test_reset_returns_to_the_state_at_creation_time() -> None:
    cfg = Cfg()
    cfg.epochs = 5  # what the program had when it called control(): that is the initial state
    s = LiveState(cfg)
    initial = dump(s)
    opt, layers, tags = cfg.opt, cfg.layers, cfg.tags
    s.set("opt.lr", 0.5)
    s.patch({"tags": {"q": 1}, "layers": [{"width": 1}], "seed": 3, "name": "B"})
    s.set("opt.sched.kind", "step")
    assert dump(s) != initial
    version = s.version
    assert s.reset() is True
    assert dump(s) == initial and cfg.epochs == 5
    assert s.version == version + 1
    assert cfg.opt is opt and cfg.layers is layers and cfg.tags is tags
    assert tags == {"a": 1} and len(layers) == 2
    assert s.reset() is False


# --- safe paths -----------------------------------------------------------------------------

FORBIDDEN_PATHS = [
    "__dict__",
    "__class__",
    "_cache",
    "__pydantic_private__",
    "LIMIT",
    "double_epochs",
    "model_dump",
    "model_fields",
    "model_config",
    "model_computed_fields",
    "opt.__dict__",
    "opt.__class__.__init__",
    "opt.model_fields",
    "opt.model_dump_json",
    "layers.0.__dict__",
    "layers.append",
    "tags.__class__",
    "__init__.__globals__",
    "opt.__pydantic_fields__",
]


@pytest.mark.parametrize("path", FORBIDDEN_PATHS)
def test_internals_are_refused_for_reading_and_writing(path: str) -> None:
    s = live()
    for change in (
        lambda: s.get(path),
        lambda: s.set(path, 1),
        lambda: s.set(path, {}),
        lambda: s.patch({"x": 1}, path),
    ):
        e = rejected(s, change, BadPath)
        assert isinstance(e, BadPath) and e.path == path
    assert s.model._cache == "hidden"
    assert Cfg.LIMIT == 5


def test_get_values_and_computed_fields() -> None:
    s = live()
    assert s.get("opt.lr") == b"0.1"
    assert s.get("layers.1.width") == b"32"
    assert s.get("tags") == b'{"a":1}'
    assert s.get("total") == b"30"  # computed fields may be read
    assert s.get() == s.model.model_dump_json().encode()
    assert b"hidden" not in s.get()
    rejected(s, lambda: s.set("total", 1), BadPath)  # ... but not written


# --- models with unusual configuration -------------------------------------------------------


class Picky(BaseModel):
    x: int = 1
    y: int = 2

    @field_validator("x")
    @classmethod
    def _value_error(cls, v: int) -> int:
        if v == 13:
            raise ValueError("unlucky")
        return v

    @field_validator("y")
    @classmethod
    def _assertion(cls, v: int) -> int:
        assert v != 13, "no thirteen"
        return v

    @model_validator(mode="after")
    def _type_error(self) -> Picky:
        if self.x == 99:
            raise TypeError("plain TypeError from a validator")
        if self.x == 77:
            raise ZeroDivisionError("a bug in the user's validator")
        return self


@pytest.mark.parametrize("field", ["x", "y"])
def test_plain_value_and_assertion_errors_in_validators_are_rejections(field: str) -> None:
    s = LiveState(Picky())
    e = rejected(s, lambda: s.set(field, 13), ValidationRejected)
    assert isinstance(e, ValidationRejected)
    assert "unlucky" in e.errors[0]["msg"] or "no thirteen" in e.errors[0]["msg"]


def test_type_error_in_a_validator_is_a_rejection() -> None:
    s = LiveState(Picky())
    e = rejected(s, lambda: s.set("x", 99), ValidationRejected)
    assert "plain TypeError" in str(e)


def test_a_buggy_validator_leaves_the_state_unchanged() -> None:
    s = LiveState(Picky())
    before = dump(s)
    with pytest.raises(ZeroDivisionError):
        s.set("x", 77)
    assert dump(s) == before and s.version == 0


def test_frozen_model_cannot_be_changed() -> None:
    class Frozen(BaseModel):
        model_config = ConfigDict(frozen=True)
        x: int = 1

    s = LiveState(Frozen())
    e = rejected(s, lambda: s.set("x", 2), BadRequest)
    assert "frozen" in str(e)


def test_frozen_nested_model_is_replaced_not_mutated() -> None:
    class Point(BaseModel):
        model_config = ConfigDict(frozen=True)
        x: int = 0

    class Outer(BaseModel):
        p: Point = Point()

    s = LiveState(Outer())
    old = s.model.p
    assert s.set("p.x", 5) is True
    assert s.model.p.x == 5 and old.x == 0 and s.model.p is not old


def test_extra_allow_accepts_new_keys_and_reset_removes_them() -> None:
    class Open(BaseModel):
        model_config = ConfigDict(extra="allow")
        x: int = 1

    s = LiveState(Open())
    assert s.patch({"note": "hi"}) is True
    assert s.model.model_extra == {"note": "hi"}
    assert s.get("note") == b'"hi"'
    assert s.set("note", "bye") is True
    assert s.reset() is True and s.model.model_extra == {}


def test_extra_forbid_with_a_computed_field_can_still_be_changed() -> None:
    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")
        x: int = 1

        @computed_field  # type: ignore[prop-decorator]
        @property
        def twice(self) -> int:
            return self.x * 2

    s = LiveState(Strict())
    assert s.set("x", 4) is True and s.model.twice == 8
    e = rejected(s, lambda: s.patch({"nope": 1}), ValidationRejected)
    assert isinstance(e, ValidationRejected) and e.errors[0]["type"] == "extra_forbidden"


def test_not_a_model_is_refused() -> None:
    with pytest.raises(TypeError, match="BaseModel"):
        LiveState({"x": 1})  # type: ignore[type-var]


def test_huge_invalid_input_is_not_echoed() -> None:
    s = live()
    big = "x" * 10_000_000
    e = rejected(s, lambda: s.set("epochs", big), ValidationRejected)
    assert isinstance(e, ValidationRejected)
    assert len(str(e)) < 500
    assert len(repr(e.errors)) < 2_000
    e = rejected(s, lambda: s.set("layers", [{"width": big}]), ValidationRejected)
    assert len(repr(e.errors)) < 2_000  # type: ignore[attr-defined]


def test_changes_wait_for_the_lock() -> None:
    s = live()
    held, release, done = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:
        with s.lock:
            held.set()
            release.wait(5)

    def changer() -> None:
        s.set("epochs", 9)
        done.set()

    threads = [threading.Thread(target=holder), threading.Thread(target=changer)]
    threads[0].start()
    assert held.wait(5)
    threads[1].start()
    assert not done.wait(0.2)
    assert s.model.epochs == 3
    release.set()
    for t in threads:
        t.join(5)
    assert done.is_set() and s.model.epochs == 9


# --- what mutation testing found unguarded (docs/reliability.md) ----------------------------


def test_a_dry_run_changes_nothing_on_every_kind_of_change() -> None:
    s = live()
    s.set("epochs", 7)
    before = s.dump_json()
    assert s.set("", {"epochs": 9}, dry_run=True) is False  # the whole state
    assert s.patch({"epochs": 9, "opt": {"lr": 0.5}}, dry_run=True) is False
    assert s.reset(dry_run=True) is False
    assert s.assign({"epochs": 9}, dry_run=True) is False
    assert s.dump_json() == before and s.version == 1


def test_the_most_negative_index_names_the_first_item() -> None:
    s = live()
    assert s.set("layers.-2.width", 8) is True  # two layers: -2 is the first
    assert s.model.layers[0].width == 8
    with pytest.raises(UnknownPath):
        s.set("layers.-3.width", 8)


class Loss(BaseModel):
    loss: float = 0.0


def test_a_change_from_nan_to_a_number_and_back_is_a_change() -> None:
    s = LiveState(Loss(loss=float("nan")))
    assert s.set("loss", 1.0) is True and s.model.loss == 1.0
    assert s.set("loss", "NaN") is True and math.isnan(s.model.loss)
    assert s.set("loss", "NaN") is False  # NaN to NaN: nothing changed
    assert s.set("loss", -0.0) is True and math.copysign(1.0, s.model.loss) == -1.0
    assert s.set("loss", 0.0) is True  # -0.0 and 0.0 read differently in JSON


def test_the_json_a_change_left_is_the_states_json_until_the_version_moves() -> None:
    live = LiveState(Cfg())
    assert live.set("opt.lr", 0.5)
    after = live.dump_json_after_change()
    assert after == live.dump_json()
    assert b'"lr":0.5' in after
    live.model.opt.lr = 0.7  # the program changes its own state; the heartbeat sees it
    assert live.poll_changed() is not None
    live.model.opt.lr = 0.9  # and again, not yet seen: no change's JSON to reuse now
    assert b'"lr":0.9' in live.dump_json_after_change()
    assert not live.set("opt.lr", 0.9)  # nothing changed: the caller dumps afresh itself
