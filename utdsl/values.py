"""The values of ``let`` and argument expressions, for :mod:`utdsl.check`.

Input: an :data:`~utdsl.syntax.Expr`, the bindings in scope and a ``report(message, span, hint)``
callback. Output: an int, float, str or bool, or :data:`BAD` once the problem has been reported.

Rules: ``+ - * /`` and unary ``-`` take numbers (not booleans, not strings); ``/`` of two integers
that divide exactly is an integer, otherwise a float as in Python. A name bound by a ``let`` is its
value; a name that is not bound is a string when it is the whole value (``activation=gelu``) and
an error inside arithmetic. An expression using a ``BAD`` value is ``BAD`` without a second report.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Callable, Mapping

from .errors import Span, UtdslError, did_you_mean
from .syntax import BinOp, Expr, Literal, Neg, Ref

__all__ = ["BAD", "evaluate", "parse_override"]

BAD: Any = object()  # the value of an expression whose error was reported
Report = Callable[..., None]

_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def evaluate(expr: Expr, scope: Mapping[str, Any], report: Report, whole: bool = True) -> Any:
    """The value of ``expr`` (``whole``: the entire value of a let or an argument), or BAD."""
    if isinstance(expr, Literal):
        return expr.value
    if isinstance(expr, Ref):
        if expr.name in scope or whole:
            return scope.get(expr.name, expr.name)
        report(f"'{expr.name}' is not bound", expr.span, did_you_mean(expr.name, scope)
               or "a name in arithmetic must be a 'let' binding defined before it")
        return BAD
    if isinstance(expr, Neg):
        operand = evaluate(expr.operand, scope, report, whole=False)
        if operand is BAD or not _number(operand, "-", expr.operand.span, report):
            return BAD
        return -operand
    return _binop(expr, scope, report)


def _number(value: Any, op: str, span: Span, report: Report) -> bool:
    """Whether ``value`` is an int or a float; report it if not."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    kind = {bool: "a boolean", str: "a string"}.get(type(value), type(value).__name__)
    report(f"'{op}' needs numbers, not {kind} ({value!r})", span)
    return False


def _binop(expr: BinOp, scope: Mapping[str, Any], report: Report) -> Any:
    left = evaluate(expr.left, scope, report, whole=False)
    right = evaluate(expr.right, scope, report, whole=False)
    if left is BAD or right is BAD:
        return BAD
    sides = ((left, expr.left.span), (right, expr.right.span))
    if not all([_number(value, expr.op, span, report) for value, span in sides]):  # report both
        return BAD
    try:
        if expr.op != "/":
            return _ARITHMETIC[expr.op](left, right)
        if right == 0:
            report("division by zero", expr.right.span)
            return BAD
        exact = isinstance(left, int) and isinstance(right, int) and left % right == 0
        return left // right if exact else left / right
    except OverflowError:
        report("number out of range", expr.span)
        return BAD


def parse_override(text: str) -> Any:
    """A ``--set name=value`` value: an integer, a float, ``true``/``false``, or else the string."""
    stripped = text.strip()
    if re.fullmatch(r"[+-]?[0-9]+", stripped) and len(stripped) < 1000:
        return int(stripped)
    if re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", stripped):
        return float(stripped)
    return {"true": True, "false": False}.get(stripped, text)


def parse_assignments(items: list[str] | None, what: str = "override") -> dict[str, str]:
    """``["lr=0.01", "epochs=5"]`` -> ``{"lr": "0.01", "epochs": "5"}`` (command-line ``--set``,
    ``-o``, ``--model-arg``); a malformed item is a UtdslError naming ``what``."""
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UtdslError(f"{what} '{item}' is not of the form name=value")
        result[key.strip()] = value.strip()
    return result


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``--model-arg depth=6 --model-arg img_size=[32,32]`` -> ``{"depth": 6, "img_size": [32, 32]}``:
    each value a JSON value, else the text itself (``timm.create_model`` keyword arguments)."""
    import json

    values = {}
    for key, text in parse_assignments(items, "--model-arg").items():
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    return values
