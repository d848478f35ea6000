"""Stage 2, check: parsed :class:`~utdsl.syntax.Spec` -> checked ``Spec``.

Input: a spec from :func:`utdsl.parse.parse`, optional ``--set`` overrides of its ``let`` bindings
and extra directories to search for ``use``d files. Output: a new ``Spec`` whose statements are
only ``Rule``/``Train``/``Freeze``, in order, with every ``use`` replaced by the statements of the
spec it names; ``name``/``description`` from the header; ``bindings`` the final ``let`` values.
In each rule, ``args`` is the validated pydantic model of its tuner's arguments, every argument
value is a ``Literal`` holding the evaluated value (so checking a checked spec changes nothing),
and ``origin`` is the path of the file the rule was written in.

Semantics:
- ``let`` binds a name to the value of its expression (:mod:`utdsl.values`), in order. A bare
  name that is not bound is a string (``activation=gelu``), but inside arithmetic an error.
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

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from . import tuners
from .library import locate_spec
from .errors import Diagnostic, Source, Span, SpecError, did_you_mean, raise_if_any
from .files import read_spec_text
from .values import BAD, evaluate, parse_override
from .collector import collector_paused, keep_as_old
from .parse import parse
from .placements import PLACEMENTS
from .roles import ROLES
from .syntax import (Arg, Chunks, Declare, Freeze, Group, Header, Let, Literal, Name, Rule, Selector,
                     Spec, Statement, Train, TunerCall, Use)

__all__ = ["check"]


def check(spec: Spec, overrides: Mapping[str, str] | None = None, *,
          search_paths: Sequence[str | os.PathLike] = ()) -> Spec:
    """Resolve ``let``/``use``, validate every rule and return the checked spec.

    ``overrides`` maps ``let`` names to values as typed on the command line (``{"r": "16"}``): an
    integer, a float, ``true``/``false``, or else a string. Raises :class:`SpecError` holding every
    problem found.
    """
    checker = _Checker(overrides or {}, search_paths)
    with collector_paused():
        statements, values = checker.file(spec, {}, _stack_of(spec), top=True)
        keep_as_old()
    header = next((s for s in spec.statements if isinstance(s, Header)), None)
    checker.check_overrides()
    raise_if_any(checker.diagnostics, SpecError)
    bindings = {name: value for name, value in values.items() if value is not BAD}
    for name, value in checker.used_values.items():
        bindings.setdefault(name, value)
    return Spec(tuple(statements), spec.source, name=header.name if header else None,
                description=header.description if header else "", bindings=bindings)


def _stack_of(spec: Spec) -> tuple[str, ...]:
    path = spec.source.path
    return (os.path.realpath(path),) if path != "<string>" and os.path.isfile(path) else ()


class _Checker:
    """One run of ``check``: walks the statements of a spec and of the specs it uses, collecting
    diagnostics instead of raising."""

    def __init__(self, overrides: Mapping[str, str], search_paths: Sequence[str | os.PathLike]):
        self.diagnostics: list[Diagnostic] = []
        self.overrides = {name: parse_override(value) for name, value in overrides.items()}
        self.raw_overrides = dict(overrides)
        self.search_paths = [str(p) for p in search_paths]
        self.let_names: list[str] = []          # every let seen, in any file (for hints)
        self.used_values: dict[str, Any] = {}   # bindings of used files (first wins)
        self.declared: dict[str, tuple[Declare, TunerCall, Any]] = {}   # declaration, checked call, args
        self.tuner_cache: dict[str, Any] = {}
        self.all_tuners: list[str] | None = None
        self.unknown_hints: dict[tuple[str, int], str] = {}

    def tuner(self, name: str):
        """``tuners.get(name)``, once per name and check: an unknown name makes it scan the
        installed packages' entry points, which takes milliseconds."""
        if name not in self.tuner_cache:
            self.tuner_cache[name] = tuners.get(name)
        return self.tuner_cache[name]

    def tuner_names(self) -> list[str]:
        if self.all_tuners is None:
            self.all_tuners = tuners.names()
        return self.all_tuners

    def error(self, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(message, span, hint))

    # ---- files and statements -----------------------------------------------------------------

    def file(self, spec: Spec, inherited: dict[str, Any], stack: tuple[str, ...], top: bool = False
             ) -> tuple[list[Statement], dict[str, Any]]:
        """The checked statements of one file and its own bindings. Headers are checked in the
        ``top`` file only (a used spec's header is ignored)."""
        scope, own, out, origin = dict(inherited), {}, [], spec.source.path
        first_header = next((s for s in spec.statements if isinstance(s, Header)), None)
        for i, statement in enumerate(spec.statements):
            try:
                if isinstance(statement, Rule):  # most statements: first
                    out.append(self.rule(statement, scope, origin))
                elif isinstance(statement, Header) and top:
                    self.header(statement, i, first_header)
                elif isinstance(statement, Let):
                    self.let(statement, scope, own, inherited)
                elif isinstance(statement, Use):
                    out.extend(self.use(statement, spec, scope, stack))
                elif isinstance(statement, Declare):
                    self.declare(statement, scope)
                elif isinstance(statement, (Train, Freeze)):
                    self.selector(statement.selector)
                    out.append(statement)
            except RecursionError:
                self.error("statement nested too deeply", statement.span)
        return out, {name: scope[name] for name in own}

    def header(self, header: Header, index: int, first: Header) -> None:
        if header is not first:
            self.error("'spec' header appears twice", header.span,
                       f"the first one is at line {first.span.line}")
        elif index:
            self.error("the 'spec' header must be the first statement", header.span)

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
        value = evaluate(let.value, scope, self.error)
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
            used = parse(read_spec_text(found), found)
        except SpecError as err:
            if Source("", found).is_spec_file:
                self.diagnostics.extend(err.diagnostics)
            else:
                first = err.diagnostics[0]
                where = f" ({first.span.location})" if first.span else ""
                self.error(f"'{use.path}' is not a spec file{where}: {first.message}", span,
                           "use names .ut spec files (or library specs)")
            return []
        statements, values = self.file(used, scope, (*stack, real))
        for name, value in values.items():
            if value is not BAD:
                self.used_values.setdefault(name, value)
        return statements

    def find(self, name: str, user: str) -> tuple[str | None, list[str]]:
        """The file ``use "name"`` names, and every place looked at."""
        return locate_spec(name, os.path.dirname(user) if user != "<string>" else "", self.search_paths)

    def declare(self, declare: Declare, scope: dict[str, Any]) -> None:
        """``tuner NAME = TUNER(ARGS)``: checked once here; rules naming it get its call."""
        if self.tuner(declare.name) is not None:
            self.error(f"'{declare.name}' is the name of a tuner; a declaration needs a name of its own",
                       declare.name_span, f"e.g. 'tuner shared_{declare.name} = ...'")
            return
        first = self.declared.get(declare.name)
        if first is not None:
            self.error(f"tuner '{declare.name}' is declared twice", declare.name_span,
                       f"first declared at line {first[0].span.line}")
            return
        call, validated = self.tuner_call(declare.tuner, scope)
        self.declared[declare.name] = (declare, call, validated)

    def rule(self, rule: Rule, scope: dict[str, Any], origin: str) -> Rule:
        self.selector(rule.selector)
        if rule.placement not in PLACEMENTS:
            self.error(f"unknown placement '{rule.placement}'", rule.placement_span,
                       did_you_mean(rule.placement, PLACEMENTS) or "placements: " + ", ".join(PLACEMENTS))
        declared = self.declared.get(rule.tuner.name) if self.tuner(rule.tuner.name) is None else None
        if declared is not None:
            declaration, call, validated = declared
            if rule.tuner.args:
                self.error(f"'{declaration.name}' is a declared tuner; its arguments are given where it is "
                           f"declared (line {declaration.span.line})", rule.tuner.span,
                           f"write '-> {rule.placement} {declaration.name}'")
            rule = _replace(rule, tuner=_replace(call, span=rule.tuner.span, name_span=rule.tuner.name_span),
                            declaration=declaration.name)
        else:
            call, validated = self.tuner_call(rule.tuner, scope)
        tuner = self.tuner(call.name)
        if rule.placement in PLACEMENTS and tuner is not None and rule.placement not in tuner.placements:
            self.error(f"tuner '{call.name}' does not accept placement '{rule.placement}'",
                       rule.placement_span, f"'{call.name}' accepts: " + ", ".join(sorted(tuner.placements)))
        return _replace(rule, tuner=call, args=validated, origin=origin)

    def tuner_call(self, call: TunerCall, scope: dict[str, Any]) -> tuple[TunerCall, Any]:
        """The call with every argument evaluated (a ``Literal``) and its validated pydantic Args
        (None after reporting what is wrong)."""
        tuner = self.tuner(call.name)
        if tuner is None:
            declared = f"; declared here: {', '.join(self.declared)}" if self.declared else ""
            key = (call.name, len(self.declared))  # the same typo a thousand times: one difflib search
            if key not in self.unknown_hints:
                self.unknown_hints[key] = (did_you_mean(call.name, [*self.tuner_names(), *self.declared])
                                           or "tuners: " + ", ".join(self.tuner_names()) + declared)
            self.error(f"unknown tuner '{call.name}'", call.name_span, self.unknown_hints[key])
        values, args, seen, evaluated = {}, [], {}, False
        for arg in call.args:
            value = evaluate(arg.value, scope, self.error)
            if arg.name in seen:
                first = seen[arg.name].span
                self.error(f"argument '{arg.name}' is given twice", _name_span(arg),
                           f"first given at line {first.line}, column {first.column}")
            else:
                seen[arg.name], values[arg.name] = arg, value
            if value is BAD or (type(arg.value) is Literal and arg.value.value is value):
                args.append(arg)  # already evaluated (a literal, or a checked spec's argument)
            else:
                args.append(_replace(arg, value=Literal(value, arg.value.span)))
                evaluated = True
        validated = None
        if tuner is not None and BAD not in values.values():
            validated = self.validate(tuner, call, values, seen)
        return (_replace(call, args=tuple(args)) if evaluated else call), validated

    def validate(self, tuner, call: TunerCall, values: dict[str, Any], args: dict[str, Arg]) -> Any:
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
        problems = dict(sorted(problems.items(),
                               key=lambda p: written.index(p[0]) if p[0] in args else len(written)))
        for field, errors in problems.items():
            kinds = {e["type"] for e in errors}
            if field in args and "extra_forbidden" in kinds:
                self.error(f"unknown argument '{field}' for tuner '{tuner.name}'", _name_span(args[field]),
                           did_you_mean(field, fields) or f"'{tuner.name}' takes: " + ", ".join(fields))
            elif field in args:
                message = "; or ".join(dict.fromkeys(re.sub(r"^Value error, ", "", e["msg"]) for e in errors))
                info = fields.get(field)
                self.error(f"bad value for '{field}': {message}", args[field].value.span,
                           info.description if info is not None else None)
            elif "missing" in kinds:
                self.error(f"tuner '{tuner.name}' needs the argument '{field}'", call.span)
            else:
                for e in errors:
                    self.error(re.sub(r"^Value error, ", "", e["msg"]), call.span)
        return None

    # ---- selectors ----------------------------------------------------------------------------

    def selector(self, selector: Selector) -> None:
        for path in selector.paths:
            if path.role is not None and path.role not in ROLES:
                known = ["@" + name for name in ROLES]
                self.error(f"unknown role '@{path.role}'", path.span,
                           did_you_mean("@" + path.role, known) or f"the roles are {', '.join(known)}")
            self.path_segments(path.segments)
            if path.chunks is not None:
                self.chunks(path.chunks)

    def path_segments(self, segments) -> None:
        for segment in segments:
            if type(segment) is Name:  # the usual segment (nodes are final classes)
                for index in segment.indices:
                    if not index.single and None not in (index.start, index.stop) \
                            and index.stop <= index.start:
                        self.error(f"empty index range [{index}]", index.span,
                                   "a range [a:b] selects a, a+1, ..., b-1")
            elif type(segment) is Group:
                for path in segment.paths:
                    self.path_segments(path.segments)

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
                same = "is listed twice" if seen[index] == label else \
                    f"and '{seen[index]}' are the same chunk"
                self.error(f"duplicate chunk: '{label}' {same}", chunks.span)
            elif index >= count >= 1:
                self.error(f"chunk {label} is out of range: {count} chunks are 0 to {count - 1}", chunks.span)
            seen.setdefault(index, label)


def _replace(node, **changes):
    """``dataclasses.replace`` at the cost of one constructor call (check makes one per argument
    and rule; AST nodes generate ``__replace__``, :func:`utdsl.records.record`)."""
    return node.__replace__(**changes)


def _name_span(arg: Arg) -> Span:
    span = arg.span
    return Span(span.line, span.column, span.line, span.column + len(arg.name), span.source)
