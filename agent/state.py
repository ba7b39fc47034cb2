"""The live pydantic state and every change applied to it. Pure: no network, no threads.

How a change is applied (set, patch, reset):

1. The path is checked against the model: every segment must be a declared field of a
   model (or a key of a dict / an index of a list inside one). ``__dict__``, ``__class__``,
   private attributes, class variables and properties are refused.
2. The change is applied to a JSON copy of the whole state, and that whole document is
   validated by the model class, exactly as declared (constraints, Literal, Optional,
   unions, validators). If anything is invalid, nothing changes. The copy is lossless:
   a non-finite float the program stored (a diverged loss) stays that float, so it never
   makes an unrelated change invalid (see :func:`_lossless_serializer`).
3. Keys the model does not declare are rejected (pydantic would silently ignore them).
4. The validated values are mirrored into the live objects in place: nested models keep
   their identity, so ``opt = state.optimizer`` held by the program sees the new values;
   lists and dicts are updated in place too. Frozen models are replaced, not mutated.

All of it runs under ``lock`` (a ``threading.RLock``), which the program may hold to read
several fields consistently.

Why one module of this size: path checking, the lossless copy, validation, the
undeclared-key check and mirroring into live objects are the five steps of one operation
under one lock; split, each would need the others' private invariants (see the steps above).
"""

from __future__ import annotations

import builtins
import copy
import functools
import math
import threading
import weakref
from typing import Any, Final, Generic, TypeVar

import msgspec
import pydantic_core
from pydantic import BaseModel, ValidationError
from pydantic_core import SchemaSerializer

from runctl.bus.errors import (
    BadPath,
    BadRequest,
    NotAnObject,
    UnknownPath,
    ValidationRejected,
)
from runctl.bus.journal import FieldChange, field_diff
from runctl.bus.jsonform import dumps, wire_value
from runctl.bus.paths import parse_index, split_path
from runctl.bus.sizelimit import SizeLimit

__all__ = ["LiveState", "check_path"]

M = TypeVar("M", bound=BaseModel)
_MISSING: Final = object()
_encoder = msgspec.json.Encoder()


class LiveState(Generic[M]):
    """The program's pydantic model, and every change applied to it (see the module
    docs); ``lock`` is held while one is."""

    def __init__(self, model: M, lock: threading.RLock | None = None) -> None:
        if not isinstance(model, BaseModel):
            raise TypeError(f"runctl controls a pydantic BaseModel, not {type(model).__name__}")
        self.model = model
        self.cls: type[M] = type(model)
        self.lock = lock or threading.RLock()
        self.version = 0
        #: record each applied change's field-level diff (the change journal turns it on)
        self.track_diffs = False
        #: the largest state one bus message carries (set once connected): a change that
        #: would make the state larger is refused before it applies (bus/sizelimit.py)
        self.size_limit: SizeLimit | None = None
        self._diffs: dict[int, list[FieldChange]] = {}
        #: the version the last change made, whose JSON ``_last_dump`` then holds
        self._changed_to = -1
        with self.lock:
            self._initial = self._json()
            self._last_dump = self.dump_json()

    # --- reading ------------------------------------------------------------------

    def _doc(self, *, round_trip: bool) -> Any:
        """The state as JSON data (dicts, lists, str, numbers), non-finite floats kept."""
        serializer = _lossless_serializer(self.cls)
        return serializer.to_python(self.model, mode="json", round_trip=round_trip)

    def _json(self) -> dict[str, Any]:
        data: dict[str, Any] = self._doc(round_trip=True)
        return data

    def dump_json(self) -> bytes:
        """The state's JSON as published: non-finite floats as ``"NaN"``/``"Infinity"``
        /``"-Infinity"`` (bus.jsonform), whatever the model's own ``ser_json_inf_nan``."""
        with self.lock:
            return dumps(self._doc(round_trip=False))

    def dump_json_after_change(self) -> bytes:
        """:meth:`dump_json`, taken once by the change that just applied (a write's reply,
        the published state and the registry record are the same bytes); dumped afresh
        if anything moved the version since."""
        with self.lock:
            if self._changed_to == self.version:
                return self._last_dump
            return self.dump_json()

    def get(self, path: str | None = None) -> bytes:
        """JSON of the state, or of the value at ``path`` (checked against the model)."""
        with self.lock:
            if not path:
                return self.dump_json()
            parts = check_path(self.model, path, for_write=False)
            node: Any = self._doc(round_trip=False)
            for part in parts:
                node = node[int(part)] if isinstance(node, list) else node[part]
            return dumps(node)

    def schema(self) -> dict[str, Any]:
        """The model's JSON schema (a NaN default in its JSON form, not null)."""
        schema: dict[str, Any] = wire_value(self.cls.model_json_schema())
        return schema

    def poll_changed(self) -> bytes | None:
        """The state's JSON if the program changed it since last time."""
        dumped, changed = self.poll()
        return dumped if changed else None

    def poll(self) -> tuple[bytes, bool]:
        """Heartbeat: the state's JSON, and whether the program changed it since last time
        (the version moves then). One serialisation for both: a large state costs the
        heartbeat once, not twice."""
        with self.lock:
            dumped = self.dump_json()
            if dumped == self._last_dump:
                return dumped, False
            self._last_dump = dumped
            self.version += 1
            return dumped, True

    # --- changing -----------------------------------------------------------------

    def set(self, path: str, value: Any, *, dry_run: bool = False) -> bool:
        """Replace the value at ``path``; the empty path replaces the whole state.

        ``dry_run`` validates exactly as a real change would, and changes nothing.
        """
        with self.lock:
            parts = check_path(self.model, path, for_write=True)
            if not parts:
                if not isinstance(value, dict):
                    raise BadRequest("the whole state can only be set to a JSON object")
                return self._apply(value, value, dry_run)
            data = self._json()
            parent = _walk(data, parts[:-1])
            last = parts[-1]
            if isinstance(parent, list):
                parent[int(last)] = value
            else:
                parent[last] = value
            return self._apply(data, _nest(parts, value), dry_run)

    def patch(
        self, value: dict[str, Any], path: str | None = None, *, dry_run: bool = False
    ) -> bool:
        """Merge ``value`` recursively (objects merge, everything else replaces)."""
        if not isinstance(value, dict):
            raise BadRequest("a patch must be a JSON object")
        with self.lock:
            parts = check_path(self.model, path or "", for_write=True)
            data = self._json()
            target = _walk(data, parts)
            if not isinstance(target, dict):
                raise NotAnObject(
                    path or "",
                    f"it holds a {type(target).__name__}, and a patch merges into an object; "
                    "set it instead",
                )
            _merge(target, value)
            return self._apply(data, _nest(parts, value), dry_run)

    def reset(self, *, dry_run: bool = False) -> bool:
        """Back to the state at ``control()`` time."""
        with self.lock:
            return self._apply(copy.deepcopy(self._initial), None, dry_run)

    def assign(self, values: dict[str, Any], *, dry_run: bool = False) -> bool:
        """Set several dotted paths at once, all or nothing (an undo sends this)."""
        if not isinstance(values, dict) or not values:
            raise BadRequest("assign needs an object of dotted paths to values")
        with self.lock:
            data = self._json()
            change: dict[str, Any] = {}
            for path, value in values.items():
                parts = check_path(self.model, path, for_write=True)
                if not parts:
                    raise BadRequest("assign sets fields: an empty path is not one")
                parent = _walk(data, parts[:-1])
                if isinstance(parent, list):
                    parent[int(parts[-1])] = value
                else:
                    parent[parts[-1]] = value
                _merge(change, _nest(parts, value))
            return self._apply(data, change, dry_run)

    def take_diff(self, version: int) -> list[FieldChange]:
        """The field-level diff of the change that made ``version`` (with ``track_diffs``);
        each is taken once."""
        return self._diffs.pop(version, [])

    def validate(self, data: dict[str, Any], change: Any) -> M:
        """The model ``data`` (a whole JSON document) validates to, as a change would be:
        declared constraints and validators, and no key ``change`` names that the model does
        not declare. Raises :class:`ValidationRejected`; changes nothing."""
        if self.cls.model_config.get("frozen"):
            raise BadRequest(f"{self.cls.__name__} is frozen: it cannot be changed")
        try:
            # non-finite floats as the NaN/Infinity tokens pydantic's JSON parser reads
            # back as floats (under any field type: float | str stays a float)
            document = pydantic_core.to_json(data, inf_nan_mode="constants")
            new = self.cls.model_validate_json(document, by_alias=True, by_name=True)
        except ValidationError as exc:
            raise ValidationRejected(
                f"{exc.error_count()} validation error(s) for {self.cls.__name__}",
                _clean_errors(exc),
            ) from None
        except (ValueError, TypeError) as exc:  # a validator raising outside pydantic's types
            raise ValidationRejected(f"{self.cls.__name__} refused the change: {exc}") from None
        if change is not None:
            _reject_undeclared(new, change, [])
        return new

    def adopt(self, new: M) -> bool:
        """Make the live state equal ``new`` (already validated), in place, as one change
        (a replay applies the journal this way). True if anything changed."""
        with self.lock:
            changed = _mirror_model(self.model, new)
            if changed:
                self._took_change()
            return changed

    def document(self) -> dict[str, Any]:
        """The state as a fresh JSON document (what a change is applied to)."""
        with self.lock:
            return self._json()

    @property
    def initial(self) -> dict[str, Any]:
        """The state at ``control()`` time as a JSON document (never modify it)."""
        return self._initial

    def _apply(self, data: dict[str, Any], change: Any, dry_run: bool = False) -> bool:
        """Validate the whole document; reject undeclared keys; refuse a state too large
        for a bus message; mirror in place."""
        new = self.validate(data, change)
        if self.size_limit is not None:
            size = len(dumps(_lossless_serializer(self.cls).to_python(new, mode="json")))
            if not self.size_limit.fits(size):
                raise self.size_limit.refused(size)
        if dry_run:
            return False
        if not self.track_diffs:
            changed = _mirror_model(self.model, new)
            if changed:
                self._took_change()
            return changed
        # only the top-level fields the change names are dumped and compared
        touched = self._touched(change)
        before = self._fields(touched)
        changed = _mirror_model(self.model, new)
        if changed:
            self._took_change()
            after = self._fields(touched)
            if len(self._diffs) > 64:  # nobody took them: never grow without bound
                self._diffs.clear()
            self._diffs[self.version] = field_diff(before, after)
        return changed

    def _took_change(self) -> None:
        self.version += 1
        self._last_dump = self.dump_json()
        self._changed_to = self.version

    def _fields(self, names: builtins.set[str] | None) -> Any:
        """The named top-level fields as published (non-finite floats in their JSON form):
        a journal's before and after must read back as they were."""
        serializer = _lossless_serializer(self.cls)
        return wire_value(serializer.to_python(self.model, mode="json", include=names))

    def _touched(self, change: Any) -> builtins.set[str] | None:
        """The top-level field names ``change`` names (None: all of them)."""
        if not isinstance(change, dict):
            return None
        names = _field_names(self.cls)
        return {names.get(str(key)) or str(key) for key in change}


# --- a lossless JSON view of the model -------------------------------------------------

_SERIALIZERS: weakref.WeakKeyDictionary[type[BaseModel], SchemaSerializer] = (
    weakref.WeakKeyDictionary()
)


def _lossless_serializer(cls: type[BaseModel]) -> SchemaSerializer:
    """``cls``'s own serializer, except that non-finite floats stay floats everywhere.

    pydantic's JSON-mode dump keeps NaN in a ``float`` field but turns it into None in
    ``Any``/``object`` fields (``ser_json_inf_nan="null"``, the default): rebuilding a
    change from that dump would turn the program's NaN into a None the model refuses, and
    block every later change. So the model's core schema is serialized with
    ``ser_json_inf_nan="constants"`` in every config it holds; everything else (aliases,
    custom serializers, other JSON settings) is the model's own. If the schema cannot be
    rebuilt (a model pydantic has not completed), the model's serializer is used.
    """
    serializer = _SERIALIZERS.get(cls)
    if serializer is None:
        try:
            schema = copy.deepcopy(cls.__pydantic_core_schema__)
            _keep_non_finite(schema)
            serializer = SchemaSerializer(schema, {"ser_json_inf_nan": "constants"})
        except Exception:  # never worse than pydantic's own dump
            serializer = cls.__pydantic_serializer__
        _SERIALIZERS[cls] = serializer
    return serializer


def _keep_non_finite(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "config" and isinstance(value, dict):
                value["ser_json_inf_nan"] = "constants"
            else:
                _keep_non_finite(value)
    elif isinstance(node, list):
        for value in node:
            _keep_non_finite(value)


# --- path checks ----------------------------------------------------------------------


def check_path(model: BaseModel, path: str, *, for_write: bool) -> list[str]:
    """Resolve ``path`` against the live model, allowing only declared data.

    Returns the segments. A write may name a new key of a dict field; nothing else new.
    """
    parts = split_path(path)
    node: Any = model
    walked: list[str] = []
    for i, part in enumerate(parts):
        where = ".".join(walked) or type(model).__name__
        if isinstance(node, BaseModel):
            cls = type(node)
            if part in cls.model_fields:
                node = node.__dict__.get(part)
            elif not for_write and part in cls.model_computed_fields:
                node = getattr(node, part)
            elif node.model_extra is not None and part in node.model_extra:
                node = node.model_extra[part]
            else:
                raise UnknownPath(path, f"{part!r} is not a declared field of {where}")
        elif isinstance(node, dict):
            if part in node:
                node = node[part]
            elif for_write and i == len(parts) - 1:
                node = None  # a new key in a dict field; the model validates it
            else:
                raise UnknownPath(path, f"no key {part!r} in {where}")
        elif isinstance(node, list | tuple):
            index = parse_index(part)
            if index is None:
                # not ``-?[0-9]+``: malformed (400), where an index out of range names nothing
                raise BadPath(path, f"{part!r} is not an index of the list {where}")
            if not -len(node) <= index < len(node):  # negative as in bus.paths.resolve
                raise UnknownPath(path, f"index {index} out of range for {where} ({len(node)})")
            node = node[index]
        else:
            raise UnknownPath(path, f"{where} is a {type(node).__name__}: it has no {part!r}")
        walked.append(part)
    return parts


# --- helpers ----------------------------------------------------------------------------


def _walk(data: Any, parts: list[str]) -> Any:
    for part in parts:
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _nest(parts: list[str], value: Any) -> Any:
    for part in reversed(parts):
        value = {part: value}
    return value


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        current = target.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value)
        else:
            target[key] = value


def _reject_undeclared(model: Any, change: Any, loc: list[str | int]) -> None:
    """Every key the change names inside a model must be a declared field of it."""
    if isinstance(model, BaseModel) and isinstance(change, dict):
        cls = type(model)
        extra = model.model_extra
        errors = []
        names = _field_names(cls)
        for key, value in change.items():
            name = names.get(key)
            if name is None and (extra is None or key not in extra):
                shown = key if len(key) <= 80 else key[:77] + "..."  # never echoed at size
                errors.append(
                    {
                        "type": "extra_forbidden",
                        "loc": [*loc, shown],
                        "msg": f"{shown!r} is not a field of {cls.__name__}",
                        "input": _preview(value),
                    }
                )
                continue
            _reject_undeclared(model.__dict__.get(name or key), value, [*loc, key])
        if errors:
            raise ValidationRejected(f"unknown field(s) for {cls.__name__}", errors)
    elif isinstance(model, list) and isinstance(change, list):
        for i, (item, sub) in enumerate(zip(model, change, strict=False)):
            _reject_undeclared(item, sub, [*loc, i])
    elif isinstance(model, list) and isinstance(change, dict):
        # a path through a list index (set "layers.1", patch at "layers.0") nests as a dict;
        # check_path let only in-range indices through: anything else is refused here too
        for key, sub in change.items():
            index = parse_index(key)
            where = ".".join(map(str, [*loc, key]))
            if index is None:
                raise BadPath(where, f"{key!r} is not an index")
            if not -len(model) <= index < len(model):
                raise UnknownPath(where, f"no index {key} in a list of {len(model)}")
            _reject_undeclared(model[index], sub, [*loc, index])
    elif isinstance(model, dict) and isinstance(change, dict):
        for key, sub in change.items():
            if key in model:
                _reject_undeclared(model[key], sub, [*loc, key])


@functools.cache
def _field_names(cls: type[BaseModel]) -> dict[str, str]:
    """Alias or name -> field name; names first: a field's own name wins over another
    field's alias. Cached per class (a replay checks thousands of changes)."""
    fields = cls.model_fields
    return {f.alias: n for n, f in fields.items() if f.alias} | {n: n for n in fields}


@functools.cache
def _declared(cls: type[BaseModel]) -> tuple[str, ...]:
    """The model's field names, cached per class (a change mirrors every field)."""
    return tuple(cls.model_fields)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if type(a) is float:  # NaN is NaN; -0.0 is not 0.0 (their JSON differs)
        return (a == b and math.copysign(1.0, a) == math.copysign(1.0, b)) or (a != a and b != b)
    try:
        return bool(a == b)
    except Exception:
        return False


def _mirror_model(live: BaseModel, new: BaseModel) -> bool:
    changed = False
    live_dict = live.__dict__
    for name in _declared(type(new)):
        nv = new.__dict__.get(name, _MISSING)
        if nv is _MISSING:
            continue
        lv = live_dict.get(name, _MISSING)
        merged, did_change = _mirror_value(lv, nv)
        if did_change:
            changed = True
            if merged is not lv:
                live_dict[name] = merged
    if new.__pydantic_extra__ is not None and live.__pydantic_extra__ is not None:
        merged, did_change = _mirror_value(live.__pydantic_extra__, new.__pydantic_extra__)
        changed |= did_change
    live.__pydantic_fields_set__.update(new.__pydantic_fields_set__)
    return changed


def _mirror_value(lv: Any, nv: Any) -> tuple[Any, bool]:
    """Make ``lv`` equal ``nv``, in place where identity matters. Returns (value, changed)."""
    if isinstance(lv, BaseModel) and type(lv) is type(nv):
        if type(lv).model_config.get("frozen"):
            return (lv, False) if _same(lv, nv) else (nv, True)
        return lv, _mirror_model(lv, nv)
    if type(lv) is list and type(nv) is list:
        if len(lv) != len(nv):
            lv[:] = nv
            return lv, True
        changed = False
        for i, item in enumerate(nv):
            merged, did = _mirror_value(lv[i], item)
            if did:
                changed = True
                if merged is not lv[i]:
                    lv[i] = merged
        return lv, changed
    if type(lv) is dict and type(nv) is dict:
        changed = False
        for key in [k for k in lv if k not in nv]:
            del lv[key]
            changed = True
        for key, item in nv.items():
            cur = lv.get(key, _MISSING)
            if cur is _MISSING:
                lv[key] = item
                changed = True
                continue
            merged, did = _mirror_value(cur, item)
            if did:
                changed = True
                if merged is not cur:
                    lv[key] = merged
        return lv, changed
    if _same(lv, nv):
        return lv, False
    return nv, True


def _preview(value: Any, limit: int = 200) -> Any:
    """Inputs are shown back only when small: a 10 MB body is never echoed."""
    if isinstance(value, float) and not math.isfinite(value):
        return wire_value(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value if not isinstance(value, str) or len(value) <= limit else value[:limit] + "…"
    text = _encoder.encode(value)
    return value if len(text) <= limit else f"<{type(value).__name__} of {len(text)} bytes>"


def _clean_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's error list, JSON-safe and without large inputs."""
    out = []
    for err in exc.errors(include_url=False):
        item: dict[str, Any] = {
            "type": err["type"],
            "loc": list(err["loc"]),
            "msg": err["msg"],
            "input": _preview(err.get("input")),
        }
        if ctx := err.get("ctx"):
            item["ctx"] = {
                k: v if isinstance(v, str | int | float | bool) else str(v) for k, v in ctx.items()
            }
        out.append(item)
    return out
