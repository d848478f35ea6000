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

__all__ = ["Binding", "Bindings", "resolve", "closest_paths", "raw_parameters", "PARAMETER_PLACEMENTS"]

#: placements whose sites may be raw parameters as well as modules
PARAMETER_PLACEMENTS = ("weight",)


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
    #: span site path -> the parent's children it runs through, in declaration order (utdsl.spans)
    spans: dict[str, tuple[str, ...]] = field(default_factory=dict)


def resolve(spec: Spec, model: nn.Module) -> Bindings:
    """Bind every rule of ``spec`` to the modules of ``model`` (and a ``weight`` rule also to its raw
    parameters, :func:`raw_parameters`); raise one SpecError listing every selector that matches
    nothing."""
    module_paths = [name for name, _ in model.named_modules() if name]
    with_parameters = module_paths + raw_parameters(model)
    position = {path: index for index, path in enumerate(with_parameters)}
    roles = role_paths(model)
    diagnostics: list[Diagnostic] = []
    by_key: dict[tuple[str, str, str], Binding] = {}
    spans: dict[str, tuple[str, ...]] = {}
    for order, rule in enumerate(spec.rules):
        candidates = with_parameters if rule.placement in PARAMETER_PLACEMENTS else module_paths
        found = {path: alternative for path in candidates
                 if (alternative := first_match(rule.selector, path, roles)) is not None}
        if not found:
            kind = "module or parameter" if candidates is with_parameters else "module"
            diagnostics.append(_no_match(rule.selector, kind, candidates, roles,
                                         [p for p in with_parameters if p not in candidates]))
        for path, alternative in found.items():
            if alternative.span_site is not None:   # a span site inside the matched module
                path = _span_site(model, path, alternative.span_site, diagnostics, spans)
                if path is None:
                    continue
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
    bindings = sorted(by_key.values(), key=lambda b: (b.order, position[b.path.split("(")[0]]))
    return Bindings(bindings, trained, _dedupe_warnings(diagnostics), spans)


def raw_parameters(model: nn.Module) -> list[str]:
    """Parameters that are not a module's ``weight`` or ``bias`` and have two or more dimensions
    (``pos_embed``, ``cls_token``, relative-position tables): sites of the ``weight`` placement
    besides modules."""
    return [name for name, p in model.named_parameters()
            if p.dim() >= 2 and name.rsplit(".", 1)[-1] not in ("weight", "bias")]


def _span_site(model: nn.Module, parent: str, run, diagnostics: list[Diagnostic],
               spans: dict[str, tuple[str, ...]]) -> str | None:
    """The site path of span ``run`` in module ``parent`` (:mod:`utdsl.spans`), its members
    recorded in ``spans``; None after a diagnostic at the span when the module lacks its ends or
    has them in the other order."""
    from .spans import check_children, site_path

    names = [name for name, _ in model.get_submodule(parent).named_children()]
    problem = check_children(parent, names, run)
    if problem is not None:
        if not any(d.span == run.span for d in diagnostics):  # once per span, not per module
            diagnostics.append(Diagnostic(problem, run.span, "a span names two children of the selected "
                                          "module, the first before the second: (A .. B) or (A ..< B)"))
        return None
    site = site_path(parent, run)
    first, last = names.index(run.start), names.index(run.end)
    spans[site] = tuple(names[first:last + 1] if run.inclusive else names[first:last])
    return site


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


def _no_match(selector: Selector, kind: str, paths: list[str], roles: dict[str, tuple[str, ...]],
              parameters: list[str] = ()) -> Diagnostic:
    text = " | ".join(str(p) for p in selector.paths)
    missing = _missing_roles(selector, roles)
    parameter = next((p for p in parameters if matches(selector, p, roles)), None)
    if parameter is not None:
        hint = f"'{parameter}' is a parameter, not a module: `weight` is the placement that tunes one"
    elif missing:
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
