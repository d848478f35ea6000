"""Stage ``resolve``: a checked spec and a model -> :class:`Bindings`, plain data saying which module
each rule binds and which base parameters train. No graph is touched here.

Order and precedence (documented, tested):
1. Rules bind in spec order; within a rule, sites come in ``model.named_modules()`` order.
2. A rule binding a site that an earlier rule bound with the same placement and tuner *shadows* it:
   the later rule wins and a warning names both lines. Different placements or tuners stack on a
   site, applied in spec order (the later wraps the earlier).
3. ``train``/``freeze`` apply in spec order to base parameters whose path, or an enclosing module
   path, the selector matches; the last statement that matches a parameter wins. Tuner parameters
   always train.
A rule or ``train``/``freeze`` that matches nothing is an error naming the closest real paths,
except ``train``/``freeze`` of a role the model lacks (``train @classifier`` on a headless model),
which warns: a library spec fits models with and without a classifier.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from torch import nn

from .errors import Diagnostic, SpecError, raise_if_any
from .roles import role_paths
from .selectors import first_match, generalize, matches
from .syntax import Chunks, Rule, Selector, Spec, Train

__all__ = ["Binding", "Bindings", "resolve", "closest_paths"]


@dataclass(frozen=True)
class Binding:
    """One rule bound to one module path."""

    rule: Rule
    path: str
    order: int  # position of the rule in the spec
    chunks: Chunks | None = None  # the parts of the output tuned (the matching alternative's)


@dataclass
class Bindings:
    bindings: list[Binding]
    trained: list[str]                     # base parameter names that train
    warnings: list[Diagnostic] = field(default_factory=list)


def resolve(spec: Spec, model: nn.Module) -> Bindings:
    """Bind every rule of ``spec`` to the modules of ``model``; raise one SpecError listing every
    selector that matches nothing."""
    module_paths = [name for name, _ in model.named_modules() if name]
    roles = role_paths(model)
    diagnostics: list[Diagnostic] = []
    by_key: dict[tuple[str, str, str], Binding] = {}
    for order, rule in enumerate(spec.rules):
        found = {path: alternative for path in module_paths
                 if (alternative := first_match(rule.selector, path, roles)) is not None}
        if not found:
            diagnostics.append(_no_match(rule.selector, "module", module_paths, roles))
        for path, alternative in found.items():
            key = (path, rule.placement, rule.tuner.name)
            earlier = by_key.get(key)
            if earlier is not None and earlier.rule is not rule:
                diagnostics.append(Diagnostic(
                    f"this rule shadows the rule at line {earlier.rule.span.line} on '{path}' "
                    f"(same placement and tuner); the later rule wins",
                    rule.span, severity="warning"))
            by_key[key] = Binding(rule, path, order, alternative.chunks)
    trained = _trained_parameters(spec, model, diagnostics, roles)
    diagnostics.sort(key=lambda d: (d.span.line, d.span.column) if d.span else (0, 0))
    raise_if_any(diagnostics, SpecError)
    bindings = sorted(by_key.values(), key=lambda b: (b.order, module_paths.index(b.path)))
    return Bindings(bindings, trained, _dedupe_warnings(diagnostics))


def _trained_parameters(spec: Spec, model: nn.Module, diagnostics: list[Diagnostic],
                        roles: dict[str, tuple[str, ...]]) -> list[str]:
    names = [name for name, _ in model.named_parameters()]
    state = dict.fromkeys(names, False)
    for statement in spec.param_rules:
        hit = [name for name in names if _selects_parameter(statement.selector, name, roles)]
        if not hit:
            missing = _missing_roles(statement.selector, roles)
            if missing and len(missing) == len(statement.selector.paths):
                verb = "train" if isinstance(statement, Train) else "freeze"
                diagnostics.append(Diagnostic(
                    f"the model has no {missing[0]} (a headless model?); '{verb} "
                    f"{statement.selector}' does nothing", statement.selector.span, severity="warning"))
            else:
                diagnostics.append(_no_match(statement.selector, "parameter", names, roles))
        for name in hit:
            state[name] = isinstance(statement, Train)
    return [name for name, trains in state.items() if trains]


def _selects_parameter(selector: Selector, name: str, roles: dict[str, tuple[str, ...]]) -> bool:
    parts = name.split(".")
    return any(matches(selector, ".".join(parts[:end]), roles) for end in range(len(parts), 0, -1))


def _missing_roles(selector: Selector, roles: dict[str, tuple[str, ...]]) -> list[str]:
    return [p.role for p in selector.paths if p.role is not None and not roles.get(p.role)]


def closest_paths(text: str, paths: list[str], n: int = 3) -> list[str]:
    """The ``n`` selector-shaped suffixes of ``paths`` closest to ``text`` (never empty)."""
    suffixes: dict[str, str] = {}
    for path in paths:
        parts = generalize(path).split(".")
        for start in range(len(parts)):
            if parts[start] == "*":
                continue
            suffixes.setdefault(".".join(parts[start:]), path)
    scored = sorted(suffixes, key=lambda s: (-difflib.SequenceMatcher(None, text, s).ratio(), len(s)))
    return [f"{s} (e.g. {suffixes[s]})" if s != suffixes[s] else s for s in scored[:n]]


def _no_match(selector: Selector, kind: str, paths: list[str], roles: dict[str, tuple[str, ...]]) -> Diagnostic:
    text = " | ".join(str(p) for p in selector.paths)
    missing = _missing_roles(selector, roles)
    if missing:
        hint = f"the model has no {missing[0]} (a headless model, or one utdsl.roles does not know)"
    else:
        hint = "closest real paths: " + ", ".join(closest_paths(text, paths))
    return Diagnostic(f"selector '{text}' matches no {kind} of the model", selector.span, hint)


def _dedupe_warnings(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    seen: dict[tuple, Diagnostic] = {}
    for d in diagnostics:
        if d.severity == "warning":
            seen.setdefault((d.span.line if d.span else None, d.message.split("'")[0]), d)
    return list(seen.values())
