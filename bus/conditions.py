"""Conditions on a rank's state: a small expression language, parsed here, never ``eval``.

::

    loss > 10
    isnan(loss) or loss > 1e3
    optimizer.lr < 1e-5 and not frozen
    layers[0].width != 128 and mode == "train"
    0.1 <= val_acc < 0.2

Grammar (lowest precedence first)::

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)*     chained as in Python
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/" | "%") unary)*
    unary   := "-" unary | power
    power   := atom ("**" unary)?
    atom    := NUMBER | STRING | true | false | null | nan | inf
             | FUNCTION "(" expr ("," expr)* ")" | path | "(" expr ")"
    path    := NAME ("." NAME | "[" INTEGER "]" | "[" STRING "]")*

Functions: ``isnan``, ``isinf``, ``isfinite``, ``abs``, ``min``, ``max``, ``len``.
``and``/``or`` may also be written ``&&``/``||``, ``not`` as ``!``.

A path reads the state's JSON (the fields of the model, dict keys, list indices): nothing
else is reachable, there are no attributes, no calls but the functions above, no loops.
The answer is ``True``, ``False`` or ``None`` (unknown): a missing field, a comparison of
a number with a string, a division by zero make the expression unknown, which never fires
(``and``/``or`` follow three-valued logic: ``unknown or true`` is true).

Non-finite numbers: JSON has no NaN or infinity. runctl's messages carry them as the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (docs/protocol.md); these strings count as
the numbers they name. ``isnan(null)`` is true too, for a state whose own serializer writes
NaN as ``null`` (test ``x == null`` to tell an empty optional field apart).

Why one module of this size: a tokenizer, a recursive-descent parser and the evaluator of
one small grammar; every parse method mirrors one line of the grammar above, so the file
reads top to bottom against it. Nothing here does I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from runctl.bus.errors import BadRequest

__all__ = ["MAX_LENGTH", "Condition", "parse"]

MAX_LENGTH: Final = 1000
MAX_DEPTH: Final = 50
#: integer powers beyond this exponent are computed as floats (no 10**10**9 in memory)
MAX_INT_EXPONENT: Final = 256

_NONFINITE: Final = {
    "nan": math.nan,
    "+nan": math.nan,
    "-nan": math.nan,
    "infinity": math.inf,
    "+infinity": math.inf,
    "inf": math.inf,
    "+inf": math.inf,
    "-infinity": -math.inf,
    "-inf": -math.inf,
}
_CONSTANTS: Final[dict[str, Any]] = {
    "true": True,
    "True": True,
    "false": False,
    "False": False,
    "null": None,
    "None": None,
    "nan": math.nan,
    "inf": math.inf,
}
_KEYWORDS: Final = {"and", "or", "not"}


class _Unknown(Exception):
    """The value cannot be known (a missing field, a type mismatch): the answer is None."""


# --- tokens ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "num", "str", "name", "op", "end"
    text: str
    value: Any
    at: int


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\*\*|<=|>=|==|!=|&&|\|\||[-+*/%<>()\[\],.!])
    """,
    re.X,
)
_ESCAPES: Final = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    at = 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            raise _error(text, at, f"unexpected {text[at]!r}")
        kind = match.lastgroup or ""
        raw = match.group()
        if kind == "num":
            value: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
            out.append(_Token("num", raw, value, at))
        elif kind == "str":
            body = raw[1:-1]
            value = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), body)
            out.append(_Token("str", raw, value, at))
        elif kind == "name":
            out.append(_Token("name", raw, raw, at))
        elif kind == "op":
            canonical = {"&&": "and", "||": "or", "!": "not"}.get(raw)
            out.append(_Token("name" if canonical else "op", canonical or raw, raw, at))
        at = match.end()
    out.append(_Token("end", "", None, len(text)))
    return out


def _error(text: str, at: int, problem: str) -> BadRequest:
    return BadRequest(f"invalid condition {text!r}: {problem} at column {at + 1}")


# --- the tree ----------------------------------------------------------------------------

Node = Callable[[Any], Any]  # state -> value (raises _Unknown)


def _path(parts: tuple[str | int, ...]) -> Node:
    def read(state: Any) -> Any:
        node = state
        for part in parts:
            if isinstance(part, int):
                if not isinstance(node, list) or not -len(node) <= part < len(node):
                    raise _Unknown
                node = node[part]
            else:
                if not isinstance(node, dict) or part not in node:
                    raise _Unknown
                node = node[part]
        return node

    return read


def _number(value: Any) -> float | int:
    """A JSON value as a number: numbers, and the strings that spell a non-finite one."""
    if isinstance(value, bool) or value is None:
        raise _Unknown
    if isinstance(value, int | float):
        return value
    if isinstance(value, str) and value.strip().lower() in _NONFINITE:
        return _NONFINITE[value.strip().lower()]
    raise _Unknown


def _isnan(value: Any) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(_number(value))
    except _Unknown:
        return False


def _isinf(value: Any) -> bool:
    try:
        return math.isinf(_number(value))
    except _Unknown:
        return False


def _isfinite(value: Any) -> bool:
    try:
        return math.isfinite(_number(value))
    except _Unknown:
        return False


def _len(value: Any) -> int:
    if isinstance(value, str | list | dict):
        return len(value)
    raise _Unknown


def _extreme(pick: Callable[..., Any]) -> Callable[..., Any]:
    def call(*values: Any) -> Any:
        return pick(_number(v) for v in values)

    return call


_FUNCTIONS: Final[dict[str, tuple[Callable[..., Any], int, int]]] = {
    # name: (function, fewest arguments, most arguments)
    "isnan": (_isnan, 1, 1),
    "isinf": (_isinf, 1, 1),
    "isfinite": (_isfinite, 1, 1),
    "abs": (lambda v: abs(_number(v)), 1, 1),
    "len": (_len, 1, 1),
    "min": (_extreme(min), 1, 16),
    "max": (_extreme(max), 1, 16),
}


def _compare(op: str, left: Any, right: Any) -> bool:
    if op in ("==", "!="):
        equal = _equal(left, right)
        return equal if op == "==" else not equal
    if isinstance(left, str) and isinstance(right, str):
        a: Any = left
        b: Any = right
    else:
        a, b = _number(left), _number(right)
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


def _equal(left: Any, right: Any) -> bool:
    numeric = (int, float)
    if isinstance(left, numeric) and isinstance(right, numeric):
        if isinstance(left, bool) != isinstance(right, bool):
            return False
        return bool(left == right)
    if isinstance(left, str) and isinstance(right, numeric) and not isinstance(right, bool):
        try:
            return bool(_number(left) == right)
        except _Unknown:
            return False
    if isinstance(right, str) and isinstance(left, numeric) and not isinstance(left, bool):
        return _equal(right, left)
    return bool(left == right)


def _arith(op: str, left: Any, right: Any) -> Any:
    a, b = _number(left), _number(right)
    try:
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return a / b
        if op == "%":
            return a % b
        if isinstance(a, int) and isinstance(b, int) and 0 <= b <= MAX_INT_EXPONENT:
            return a**b
        return float(a) ** float(b)
    except ZeroDivisionError:
        raise _Unknown from None
    except OverflowError:
        return math.inf
    except (ValueError, TypeError):  # complex results, e.g. (-8) ** 0.5
        raise _Unknown from None


def _truth(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value) and not math.isnan(value)
    return bool(value)


# --- the parser --------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.at = 0
        self.depth = 0
        self.roots: set[str] = set()

    @property
    def token(self) -> _Token:
        return self.tokens[self.at]

    def take(self) -> _Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def accept(self, kind: str, text: str) -> bool:
        if self.token.kind == kind and self.token.text == text:
            self.at += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept("op", text):
            raise self.fail(f"expected {text!r}")

    def fail(self, problem: str) -> BadRequest:
        token = self.token
        found = "the end" if token.kind == "end" else repr(token.text)
        return _error(self.text, token.at, f"{problem}, found {found}")

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(self.text, self.token.at, f"nested deeper than {MAX_DEPTH} levels")

    # grammar, lowest precedence first

    def parse(self) -> Node:
        node = self.or_()
        if self.token.kind != "end":
            raise self.fail("expected an operator or the end")
        return node

    def or_(self) -> Node:
        terms = [self.and_()]
        while self.accept("name", "or"):
            terms.append(self.and_())
        if len(terms) == 1:
            return terms[0]

        def any_of(state: Any) -> Any:
            unknown = False
            for term in terms:
                truth = _known(term, state)
                if truth is True:
                    return True
                unknown = unknown or truth is None
            return None if unknown else False

        return any_of

    def and_(self) -> Node:
        terms = [self.not_()]
        while self.accept("name", "and"):
            terms.append(self.not_())
        if len(terms) == 1:
            return terms[0]

        def all_of(state: Any) -> Any:
            unknown = False
            for term in terms:
                truth = _known(term, state)
                if truth is False:
                    return False
                unknown = unknown or truth is None
            return None if unknown else True

        return all_of

    def not_(self) -> Node:
        if self.accept("name", "not"):
            self.nested()
            inner = self.not_()
            self.depth -= 1

            def negate(state: Any) -> Any:
                truth = _known(inner, state)
                return None if truth is None else not truth

            return negate
        return self.compare()

    def compare(self) -> Node:
        first = self.sum()
        chain: list[tuple[str, Node]] = []
        while self.token.kind == "op" and self.token.text in ("<", "<=", ">", ">=", "==", "!="):
            op = self.take().text
            chain.append((op, self.sum()))
        if not chain:
            return first

        def compared(state: Any) -> Any:
            left = first(state)
            for op, node in chain:
                right = node(state)
                if not _compare(op, left, right):
                    return False
                left = right
            return True

        return compared

    def sum(self) -> Node:
        node = self.product()
        while self.token.kind == "op" and self.token.text in ("+", "-"):
            node = _binary(self.take().text, node, self.product())
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.token.kind == "op" and self.token.text in ("*", "/", "%"):
            node = _binary(self.take().text, node, self.unary())
        return node

    def unary(self) -> Node:
        if self.accept("op", "-"):
            self.nested()
            inner = self.unary()
            self.depth -= 1
            return lambda state: -_number(inner(state))
        if self.accept("op", "+"):
            self.nested()
            inner = self.unary()
            self.depth -= 1
            return lambda state: _number(inner(state))
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if self.accept("op", "**"):
            self.nested()
            exponent = self.unary()
            self.depth -= 1
            return _binary("**", base, exponent)
        return base

    def atom(self) -> Node:
        token = self.token
        if token.kind in ("num", "str"):
            self.at += 1
            value = token.value
            return lambda state: value
        if token.kind == "op" and token.text == "(":
            self.at += 1
            self.nested()
            inner = self.or_()
            self.depth -= 1
            self.expect(")")
            return inner
        if token.kind == "name" and token.text not in _KEYWORDS:
            self.at += 1
            if self.token.kind == "op" and self.token.text == "(":
                return self.call(token)
            if token.text in _CONSTANTS and not self._continues_path():
                constant = _CONSTANTS[token.text]
                return lambda state: constant
            return self.path(token.text)
        raise self.fail("expected a value (a number, a string, a field or a function)")

    def _continues_path(self) -> bool:
        return self.token.kind == "op" and self.token.text in (".", "[")

    def call(self, name: _Token) -> Node:
        if name.text not in _FUNCTIONS:
            known = ", ".join(_FUNCTIONS)
            raise _error(self.text, name.at, f"unknown function {name.text!r} (known: {known})")
        function, fewest, most = _FUNCTIONS[name.text]
        self.expect("(")
        self.nested()
        args = [self.or_()]
        while self.accept("op", ","):
            args.append(self.or_())
        self.depth -= 1
        self.expect(")")
        if not fewest <= len(args) <= most:
            count = str(fewest) if fewest == most else f"{fewest} to {most}"
            raise _error(self.text, name.at, f"{name.text}() takes {count} argument(s)")
        return lambda state: function(*(arg(state) for arg in args))

    def path(self, root: str) -> Node:
        parts: list[str | int] = [root]
        self.roots.add(root)
        while True:
            if self.accept("op", "."):
                token = self.take()
                if token.kind != "name":
                    self.at -= 1
                    raise self.fail("expected a field name after '.'")
                parts.append(token.text)
            elif self.accept("op", "["):
                negative = self.accept("op", "-")
                token = self.take()
                if token.kind == "num" and isinstance(token.value, int):
                    parts.append(-token.value if negative else token.value)
                elif token.kind == "str" and not negative:
                    parts.append(token.value)
                else:
                    self.at -= 1
                    raise self.fail("expected an integer index or a quoted key")
                self.expect("]")
            else:
                return _path(tuple(parts))


def _binary(op: str, left: Node, right: Node) -> Node:
    return lambda state: _arith(op, left(state), right(state))


def _known(node: Node, state: Any) -> bool | None:
    try:
        return _truth(node(state))
    except _Unknown:
        return None


# --- the public face ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed condition; :meth:`evaluate` it against a state (any JSON value)."""

    source: str
    #: the top-level fields it reads (to tell a user that a field does not exist)
    fields: frozenset[str]
    _node: Node

    def evaluate(self, state: Mapping[str, Any] | Any) -> bool | None:
        """True or False, or None when it cannot be known (a missing field, a type
        mismatch, a division by zero). Never raises for any JSON ``state``."""
        try:
            return _known(self._node, state)
        except RecursionError:
            return None

    def missing(self, state: Mapping[str, Any] | Any) -> list[str]:
        """The fields it reads that ``state`` does not have."""
        have = state if isinstance(state, dict) else {}
        return sorted(f for f in self.fields if f not in have)

    def __str__(self) -> str:
        return self.source


def parse(text: str) -> Condition:
    """Parse ``text``; raises :class:`~runctl.bus.errors.BadRequest` naming the column of
    the first problem (``invalid condition 'loss >> 1': expected a value ... at column 7``)."""
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("invalid condition: it is empty (e.g. 'loss > 10')")
    if len(text) > MAX_LENGTH:
        raise BadRequest(f"invalid condition: longer than {MAX_LENGTH} characters")
    parser = _Parser(text)
    node = parser.parse()
    return Condition(text.strip(), frozenset(parser.roots), node)
