"""Tuners from outside utdsl: :func:`register_tuner` and the ``utdsl.tuners`` entry-point group.

A third-party tuner is a plain ``nn.Module`` class built as ``module_cls(args, site)`` (``args``
its validated pydantic arguments, ``site`` a :class:`~utdsl.tuners.SiteInfo`) whose forward maps
a tensor whose last axis holds ``site.in_features`` channels to one with ``site.out_features``
(the ``parallel`` and ``sequential`` joints move a channels-first value's channel axis there and
back). :func:`register_tuner` wraps it in a :class:`~utdsl.tuners.Tuner` descriptor class, so the
checker, planner, checkpoints and ``utdsl.verify`` treat it as they treat a built-in; the units in
a compiled model are instances of ``module_cls`` itself (so a compiled model pickles).

Entry points (``[project.entry-points."utdsl.tuners"]``, ``NAME = "package.module:OBJECT"``) are
read lazily: a spec naming a tuner that is not registered loads the entry point of that name,
whose import may call :func:`register_tuner` (``OBJECT`` is then what it returned) or whose
``OBJECT`` is a :class:`~utdsl.tuners.Tuner` subclass, registered on loading. Built-in names win
over entry points of the same name.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any, Callable, Iterable

from pydantic import BaseModel
from torch import nn

from .base import SiteInfo, Tuner, TunerArgs

__all__ = ["register_tuner", "entry_point_names", "load_entry_point", "GROUP", "PLUGIN_PLACEMENTS"]

GROUP = "utdsl.tuners"
#: the placements whose tuner interface is "a module on the channel axis" (what a plain module offers)
PLUGIN_PLACEMENTS = frozenset({"parallel", "sequential"})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def register_tuner(name: str, module_cls: type[nn.Module], args_model: type[BaseModel], *,
                   placements: Iterable[str] = ("parallel", "sequential"), residual: bool = True,
                   identity_at_init: bool | Callable[[Any], bool] = False, summary: str = "") -> type[Tuner]:
    """Register ``module_cls`` as the tuner ``name`` for specs to use; returns its descriptor class.

    ``args_model``: a pydantic model of the arguments that forbids unknown ones (subclass
    :class:`utdsl.tuners.TunerArgs`). ``placements``: where it may be attached (``parallel``:
    y = h + U(x); ``sequential``: y = h + U(h), or U(h) when ``residual`` is False).
    ``identity_at_init``: whether the module leaves its site's output unchanged at step 0 (a bool,
    or a function of the validated arguments); ``utdsl.verify`` checks it. Registering a name twice
    with another module, or a name a spec cannot write, is a ``ValueError``.
    """
    from . import REGISTRY, register  # the registry imports this module

    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"tuner name {name!r} is not a spec name ([A-Za-z_][A-Za-z0-9_]*)")
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise TypeError(f"module_cls must be an nn.Module subclass, got {module_cls!r}")
    if not (isinstance(args_model, type) and issubclass(args_model, BaseModel)):
        raise TypeError(f"args_model must be a pydantic BaseModel subclass, got {args_model!r}")
    if args_model.model_config.get("extra") != "forbid":
        raise TypeError(f"{args_model.__name__} must forbid unknown arguments: subclass utdsl.tuners.TunerArgs "
                        "or set model_config = ConfigDict(extra='forbid')")
    accepted = frozenset(placements)
    unknown = sorted(accepted - PLUGIN_PLACEMENTS)
    if not accepted or unknown:
        raise ValueError(f"placements of a registered module must be among {sorted(PLUGIN_PLACEMENTS)}"
                         + (f", not {unknown}" if unknown else ""))
    existing = REGISTRY.get(name)
    if existing is not None:
        if getattr(existing, "module_cls", None) is module_cls:
            return existing
        raise ValueError(f"tuner {name!r} is already registered ({existing.__module__}.{existing.__qualname__})")
    identity = identity_at_init if callable(identity_at_init) else (lambda args, value=bool(identity_at_init): value)

    def build(cls, args: TunerArgs, site: SiteInfo) -> nn.Module:
        return cls.module_cls(args, site)

    descriptor = type(f"{module_cls.__name__}Tuner", (Tuner,), {
        "__module__": module_cls.__module__, "__doc__": module_cls.__doc__,
        "name": name, "Args": args_model, "placements": accepted, "residual": residual,
        "summary": summary or (module_cls.__doc__ or "").strip().split("\n")[0], "module_cls": module_cls,
        "build": classmethod(build),
        "identity_at_init": classmethod(lambda cls, args: bool(identity(args))),
    })
    return register(descriptor)


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=GROUP))


def entry_point_names() -> list[str]:
    """The names installed packages declare in the ``utdsl.tuners`` group (nothing is imported)."""
    return sorted({ep.name for ep in _entry_points()})


def load_entry_point(name: str) -> type[Tuner] | None:
    """Load the entry point ``name`` of the ``utdsl.tuners`` group and return the tuner it
    registers, or None when no installed package declares it. A failure to import it, or an object
    that is not a tuner, is a :class:`~utdsl.errors.SpecError` naming the package."""
    from ..errors import SpecError
    from . import REGISTRY, register

    found = [ep for ep in _entry_points() if ep.name == name]
    if not found:
        return None
    ep = found[0]
    where = f"entry point '{ep.name} = {ep.value}'" + (f" of package '{ep.dist.name}'" if ep.dist else "")
    try:
        obj = ep.load()
    except Exception as error:  # noqa: BLE001 - any import-time failure of a third-party package
        raise SpecError(f"tuner '{name}' ({where}) failed to load: {type(error).__name__}: {error}",
                        hint=f"fix or uninstall the package; `python -c \"import {ep.module}\"` shows the error") from error
    if name in REGISTRY:   # its import called register_tuner (or it named a registered class)
        return REGISTRY[name]
    if isinstance(obj, type) and issubclass(obj, Tuner) and getattr(obj, "name", None) == name:
        return register(obj)
    raise SpecError(f"tuner '{name}' ({where}) names {obj!r}, which is not a tuner called '{name}'",
                    hint="point the entry point at what utdsl.register_tuner returned, or at a "
                         "utdsl.tuners.Tuner subclass whose name is the entry point's")
