"""Stage 2, check: parsed :class:`~utdsl.syntax.Spec` -> checked ``Spec``.

Input: a spec from :func:`utdsl.parse.parse`, optional ``--set`` overrides of its ``let`` bindings
and extra directories to search for ``use``d files. Output: a new ``Spec`` whose statements are
only ``Rule``/``Train``/``Freeze``, in order, with every ``use`` replaced by the statements of the
spec it names; ``name``/``description`` from the header; ``bindings`` the final ``let`` values.
In each rule, ``args`` is the validated pydantic model of its tuner's arguments, every argument
value is a ``Literal`` holding the evaluated value (so checking a checked spec changes nothing),
and ``origin`` is the path of the file the rule was written in.

Semantics:
- ``let`` binds a name to the value of its expression, evaluated in order. A bare name that is not
  bound is a string (``activation=gelu``), but inside arithmetic it is an error. ``+ - * /`` take
  numbers; ``/`` of two integers that divide exactly is an integer.
- ``use "f"`` looks for ``f`` (then ``f.ut``) next to the using file (the working directory for a
  spec given as text), in ``search_paths``, then in the library (``utdsl.specs``). A used spec sees
  the bindings of its user at the ``use``: a name already bound there keeps its value, so its
  ``let``s are defaults (``let r = 16`` then ``use "lora"``). Its own bindings do not leak back.
  The header of a used spec is ignored.
- an override replaces the value of every ``let`` of that name, in any file.

Invariants: every problem is collected, then one :class:`~utdsl.errors.SpecError` holds them all,
each at the span of the offending text (in the file it is in) with a hint where one helps.
"""

from __future__ import annotations

import operator
import os
import re
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from . import tuners
from .errors import Diagnostic, Span, SpecError, did_you_mean, raise_if_any
from .parse import parse
from .placements import PLACEMENTS
from .syntax import (Arg, BinOp, Chunks, Expr, Freeze, Group, Header, Let, Literal, Name, Neg, Ref,
                     Rule, Selector, Spec, Statement, Train, Use)

__all__ = ["check"]

_BAD = object()  # the value of an expression that already has an error: no cascading errors
_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def check(spec: Spec, overrides: Mapping[str, str] | None = None, *,
          search_paths: Sequence[str | os.PathLike] = ()) -> Spec:
    """Resolve ``let``/``use``, validate every rule and return the checked spec.

    ``overrides`` maps ``let`` names to values as typed on the command line (``{"r": "16"}``): an
    integer, a float, ``true``/``false``, or else a string. Raises :class:`SpecError` holding every
    problem found.
    """
    checker = _Checker(overrides or {}, [Path(p) for p in search_paths])
    statements, values = checker.file(spec, {}, _stack_of(spec), top=True)
    header = next((s for s in spec.statements if isinstance(s, Header)), None)
    checker.check_overrides()
    raise_if_any(checker.diagnostics, SpecError)
    bindings = {name: value for name, value in values.items() if value is not _BAD}
    for name, value in checker.used_values.items():
        bindings.setdefault(name, value)
    return Spec(tuple(statements), spec.source, name=header.name if header else None,
                description=header.description if header else "", bindings=bindings)


def _stack_of(spec: Spec) -> tuple[str, ...]:
    path = spec.source.path
    return (os.path.realpath(path),) if path != "<string>" and os.path.isfile(path) else ()


def _override_value(text: str) -> Any:
    stripped = text.strip()
    if re.fullmatch(r"[+-]?[0-9]+", stripped) and len(stripped) < 1000:
        return int(stripped)
    if re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", stripped):
        return float(stripped)
    return {"true": True, "false": False}.get(stripped, text)


class _Checker:
    def __init__(self, overrides: Mapping[str, str], search_paths: list[Path]):
        self.diagnostics: list[Diagnostic] = []
        self.overrides = {name: _override_value(value) for name, value in overrides.items()}
        self.raw_overrides = dict(overrides)
        self.search_paths = search_paths
        self.let_names: list[str] = []          # every let seen, in any file (for hints)
        self.used_values: dict[str, Any] = {}   # bindings of used files (first wins)

    def error(self, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(message, span, hint))

    # ---- files and statements -----------------------------------------------------------------

    def file(self, spec: Spec, inherited: dict[str, Any], stack: tuple[str, ...], top: bool = False
             ) -> tuple[list[Statement], dict[str, Any]]:
        """The checked statements of one file and its own bindings (headers: see ``header``)."""
        scope, own, out, first_header = dict(inherited), {}, [], None
        for i, statement in enumerate(spec.statements):
            if isinstance(statement, Header) and top:
                first_header = self.header(statement, i, first_header)
            elif isinstance(statement, Let):
                self.let(statement, scope, own, inherited)
            elif isinstance(statement, Use):
                out.extend(self.use(statement, spec, scope, stack))
            elif isinstance(statement, Rule):
                out.append(self.rule(statement, scope, spec.source.path))
            elif isinstance(statement, (Train, Freeze)):
                self.selector(statement.selector)
                out.append(statement)
        return out, {name: scope[name] for name in own}

    def header(self, header: Header, index: int, first: Header | None) -> Header:
        """Report a header of the checked spec that is not its first statement; the first header."""
        if first is not None:
            self.error("'spec' header appears twice", header.span, f"the first one is at line {first.span.line}")
        elif index:
            self.error("the 'spec' header must be the first statement", header.span)
        return first or header

    def check_overrides(self) -> None:
        for name in self.overrides:
            if name not in self.let_names:
                hint = did_you_mean(name, self.let_names) or (
                    "the spec's lets are: " + ", ".join(dict.fromkeys(self.let_names))
                    if self.let_names else "the spec has no 'let' bindings")
                self.error(f"--set {name}={self.raw_overrides[name]}: the spec has no 'let {name}'",
                           None, hint)

    def let(self, let: Let, scope: dict[str, Any], own: dict[str, Let], inherited: dict) -> None:
        self.let_names.append(let.name)
        if let.name in own:
            self.error(f"'{let.name}' is bound twice", let.span,
                       f"first bound at line {own[let.name].span.line}")
            return
        own[let.name] = let
        value = self.value(let.value, scope)
        if let.name in inherited:
            return  # the using spec set it first: this let is a default
        scope[let.name] = self.overrides.get(let.name, value)

    def use(self, use: Use, spec: Spec, scope: dict[str, Any], stack: tuple[str, ...]
            ) -> list[Statement]:
        span = use.path_span or use.span
        found, searched = self.find(use.path, spec.source.path)
        if found is None:
            self.error(f"cannot find the spec '{use.path}'", span, "searched " + ", ".join(searched))
            return []
        real = os.path.realpath(found)
        if real in stack:
            chain = " -> ".join(os.path.basename(p) for p in (*stack[stack.index(real):], real))
            self.error(f"'{use.path}' is used in a cycle: {chain}", span)
            return []
        try:
            text = Path(found).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            self.error(f"cannot read '{found}': {err}", span)
            return []
        try:
            used = parse(text, found)
        except SpecError as err:
            self.diagnostics.extend(err.diagnostics)
            return []
        statements, values = self.file(used, scope, (*stack, real))
        for name, value in values.items():
            if value is not _BAD:
                self.used_values.setdefault(name, value)
        return statements

    def find(self, name: str, user: str) -> tuple[str | None, list[str]]:
        """The file ``use "name"`` names, and every place looked at."""
        path = Path(name)
        names = [path] if path.suffix == ".ut" else [path, path.with_name(path.name + ".ut")]
        base = Path(user).parent if user != "<string>" else Path(".")
        dirs = [Path()] if path.is_absolute() else [base, *self.search_paths]
        candidates = [str(d / n) for d in dirs for n in names]
        if not path.is_absolute() and len(path.parts) == 1:
            library = resources.files("utdsl.specs")
            candidates += [str(library / n.name) for n in names]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        return found, candidates

    def rule(self, rule: Rule, scope: dict[str, Any], origin: str) -> Rule:
        self.selector(rule.selector)
        call = rule.tuner
        tuner = tuners.get(call.name)
        if rule.placement not in PLACEMENTS:
            self.error(f"unknown placement '{rule.placement}'", rule.placement_span,
                       did_you_mean(rule.placement, PLACEMENTS) or "placements: " + ", ".join(PLACEMENTS))
        if tuner is None:
            self.error(f"unknown tuner '{call.name}'", call.name_span,
                       did_you_mean(call.name, tuners.names()) or "tuners: " + ", ".join(tuners.names()))
        elif rule.placement in PLACEMENTS and rule.placement not in tuner.placements:
            self.error(f"tuner '{call.name}' does not accept placement '{rule.placement}'",
                       rule.placement_span, f"'{call.name}' accepts: " + ", ".join(sorted(tuner.placements)))
        values, args, seen = {}, [], {}
        for arg in call.args:
            value = self.value(arg.value, scope)
            if arg.name in seen:
                self.error(f"argument '{arg.name}' is given twice", _name_span(arg),
                           f"first given at line {seen[arg.name].span.line}, column {seen[arg.name].span.column}")
            seen.setdefault(arg.name, arg)
            values.setdefault(arg.name, value)
            args.append(replace(arg, value=Literal(value, arg.value.span)) if value is not _BAD else arg)
        validated = None
        if tuner is not None and _BAD not in values.values():
            validated = self.validate(tuner, rule, values, seen)
        return replace(rule, tuner=replace(call, args=tuple(args)), args=validated, origin=origin)

    def validate(self, tuner, rule: Rule, values: dict[str, Any], args: dict[str, Arg]) -> Any:
        """The tuner's pydantic Args, or None after reporting each error at its argument."""
        try:
            return tuner.Args.model_validate(values)
        except ValidationError as err:
            problems: dict[str | None, list[dict]] = {}
            for e in err.errors():
                field = e["loc"][0] if e["loc"] and isinstance(e["loc"][0], str) else None
                problems.setdefault(field, []).append(e)
        fields = tuner.Args.model_fields
        written = list(args)  # report in the order the arguments are written
        problems = dict(sorted(problems.items(), key=lambda p: written.index(p[0]) if p[0] in args else len(written)))
        for field, errors in problems.items():
            kinds = {e["type"] for e in errors}
            if field in args and "extra_forbidden" in kinds:
                self.error(f"unknown argument '{field}' for tuner '{tuner.name}'", _name_span(args[field]),
                           did_you_mean(field, fields) or f"'{tuner.name}' takes: " + ", ".join(fields))
            elif field in args:
                message = "; or ".join(dict.fromkeys(e["msg"] for e in errors))
                info = fields.get(field)
                self.error(f"bad value for '{field}': {message}", args[field].value.span,
                           info.description if info is not None else None)
            elif "missing" in kinds:
                self.error(f"tuner '{tuner.name}' needs the argument '{field}'", rule.tuner.span)
            else:
                for e in errors:
                    self.error(re.sub(r"^Value error, ", "", e["msg"]), rule.tuner.span)
        return None

    # ---- selectors ----------------------------------------------------------------------------

    def selector(self, selector: Selector) -> None:
        for path in selector.paths:
            self.path_segments(path.segments)
        if selector.chunks is not None:
            self.chunks(selector.chunks)

    def path_segments(self, segments) -> None:
        for segment in segments:
            if isinstance(segment, Group):
                for path in segment.paths:
                    self.path_segments(path.segments)
            elif isinstance(segment, Name):
                for index in segment.indices:
                    if not index.single and None not in (index.start, index.stop) \
                            and index.stop <= index.start:
                        self.error(f"empty index range [{index}]", index.span,
                                   "a range [a:b] selects a, a+1, ..., b-1")

    def chunks(self, chunks: Chunks) -> None:
        hint = "chunks are q, k, v (thirds) or indices with a count: {0, 2 of 4}"
        count, seen = chunks.count, {}
        if count < 1:
            self.error("chunk indices need a count of at least 1: {0, 2 of 4}", chunks.span)
        elif count != 3 and {"q", "k", "v"} & set(chunks.labels):
            self.error(f"q, k and v are chunks of 3, not of {count}", chunks.span, hint)
        for label, index in zip(chunks.labels, chunks.indices):
            if index < 0:
                self.error(f"unknown chunk '{label}'", chunks.span, hint)
            elif index in seen:
                self.error(f"duplicate chunk: '{label}'" + (
                    " is listed twice" if seen[index] == label else f" and '{seen[index]}' are the same chunk"),
                    chunks.span)
            elif index >= count >= 1:
                self.error(f"chunk {label} is out of range: {count} chunks are 0 to {count - 1}", chunks.span)
            seen.setdefault(index, label)

    # ---- values -------------------------------------------------------------------------------

    def value(self, expr: Expr, scope: dict[str, Any], whole: bool = True) -> Any:
        """The value of ``expr``, or _BAD after reporting why. A name that is not bound is a
        string when it is the ``whole`` value of a let or an argument, an error in arithmetic."""
        if isinstance(expr, Literal):
            return expr.value
        if isinstance(expr, Ref):
            if expr.name in scope or whole:
                return scope.get(expr.name, expr.name)
            self.error(f"'{expr.name}' is not bound", expr.span,
                       did_you_mean(expr.name, scope) or
                       "a name in arithmetic must be a 'let' binding defined before it")
            return _BAD
        if isinstance(expr, Neg):
            operand = self.value(expr.operand, scope, whole=False)
            if operand is _BAD or self.number(operand, "-", expr.operand.span):
                return _BAD
            return -operand
        return self.binop(expr, scope)

    def number(self, value: Any, op: str, span: Span) -> bool:
        """Report (and return True) unless ``value`` is an int or float."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return False
        kind = {bool: "a boolean", str: "a string"}.get(type(value), type(value).__name__)
        self.error(f"'{op}' needs numbers, not {kind} ({value!r})", span)
        return True

    def binop(self, expr: BinOp, scope: dict[str, Any]) -> Any:
        left, right = self.value(expr.left, scope, False), self.value(expr.right, scope, False)
        if left is _BAD or right is _BAD:
            return _BAD
        bad_left = self.number(left, expr.op, expr.left.span)
        if bad_left | self.number(right, expr.op, expr.right.span):
            return _BAD
        try:
            if expr.op == "/":
                if right == 0:
                    self.error("division by zero", expr.right.span)
                    return _BAD
                exact = isinstance(left, int) and isinstance(right, int) and left % right == 0
                return left // right if exact else left / right
            return _ARITHMETIC[expr.op](left, right)
        except OverflowError:
            self.error("number out of range", expr.span)
            return _BAD


def _name_span(arg: Arg) -> Span:
    span = arg.span
    return Span(span.line, span.column, span.line, span.column + len(arg.name), span.source)
