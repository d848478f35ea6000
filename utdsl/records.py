"""Frozen records that are cheap to build by the million.

The spec AST (:mod:`utdsl.syntax`) and source spans (:class:`utdsl.errors.Span`) of a spec of
100,000 rules are millions of objects; :func:`record` makes them slotted frozen dataclasses whose
``__init__`` costs half the dataclass one's.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

__all__ = ["record"]


def record(cls: type) -> type:
    """``@dataclass(frozen=True, slots=True)`` with two generated methods that a spec of 100,000
    rules calls millions of times: an ``__init__`` that sets each slot through its descriptor (it
    bypasses the frozen ``__setattr__`` as the dataclass one does, at half the cost of its
    ``object.__setattr__`` calls; same signature, defaults included) and ``__replace__`` (what
    ``dataclasses.replace`` does, without its introspection; ``copy.replace`` from Python 3.13)."""
    cls = dataclass(frozen=True, slots=True)(cls)
    names = [item.name for item in fields(cls)]
    scope: dict[str, Any] = {"_cls": cls, "_KEEP": _KEEP}
    params = []
    for item in fields(cls):
        if item.default_factory is not MISSING:
            raise TypeError(f"{cls.__name__}.{item.name}: @record takes plain defaults, not a default_factory")
        scope[f"_set_{item.name}"] = cls.__dict__[item.name].__set__
        if item.default is MISSING:
            params.append(item.name)
        else:
            scope[f"_default_{item.name}"] = item.default
            params.append(f"{item.name}=_default_{item.name}")
    sets = "".join(f"    _set_{name}(self, {name})\n" for name in names)
    keeps = ", ".join(f"{name}=_KEEP" for name in names)
    kept = ", ".join(f"self.{name} if {name} is _KEEP else {name}" for name in names)
    namespace: dict[str, Any] = {}
    exec(f"def __init__(self, {', '.join(params)}):\n{sets}\n"
         f"def __replace__(self, *, {keeps}):\n    return _cls({kept})\n", scope, namespace)
    for method in ("__init__", "__replace__"):
        namespace[method].__qualname__ = f"{cls.__qualname__}.{method}"
        setattr(cls, method, namespace[method])
    return cls


_KEEP: Any = object()  # a field that ``__replace__`` leaves as it is
