"""What every placement is: a planning step that sizes a tuner from its site's traced graph, and a
rewriting step that inserts it; plus the tools every placement's rewriting step uses.

A placement's ``analyze`` runs in stage ``plan`` on the untouched, shape-propagated graph and raises
:class:`SiteError` on a site that does not fit; its ``insert`` runs in stage ``rewrite``. Tuners are
built by :func:`build_units` (one unit per chunk label, or :data:`FULL`) on the site's device and
dtype, and reused through :func:`shared_module` when the same plan is rewritten into a second graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.fx as fx
from torch import nn

from .. import tuners
from ..resolve import Binding
from ..trace import Region, stack_up_to
from ..tuners import SiteInfo

if TYPE_CHECKING:
    from ..plan import Insertion

__all__ = ["FULL", "ModuleTable", "SiteError", "Placement", "tensor_shape", "site_device_dtype", "build_units",
           "shared_module", "add_node_after", "has_module", "has_parameter"]

FULL = "full"
"""The unit key of a site without chunks."""


class SiteError(Exception):
    """A site that does not fit its rule's placement; ``plan`` reports it at the rule (at ``span``,
    an argument of the rule, when given)."""

    def __init__(self, message: str, hint: str | None = None, span=None):
        super().__init__(message)
        self.message, self.hint = message, hint
        self.span = span      # where in the spec, when more precise than the rule (an argument)


class Placement:
    """Base of every placement. Subclasses set ``name`` and ``summary`` and implement both steps."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    #: whether a site read at several places (a weight used by several functional calls) is refused
    single_use: ClassVar[bool] = True

    @classmethod
    def analyze(cls, binding: Binding, found: Region, module: nn.Module | None,
                gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
        """The tuner's :class:`SiteInfo` at ``found`` (``binding``'s region; per chunk when it names
        chunks) and the channel axes of the site's input and output. ``module`` is the site's module
        in ``gm`` (None when traced through). Raises :class:`SiteError` on a site that does not fit."""
        raise NotImplementedError

    @classmethod
    def insert(cls, gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
        """Insert ``insertion``'s tuner into ``gm`` at ``found`` (looked up again before each insertion)."""
        raise NotImplementedError

    @classmethod
    def finish(cls, gm: fx.GraphModule) -> None:
        """Rewrite what this placement inserted once every insertion of the plan is in (default: nothing)."""

    @classmethod
    def label(cls, insertion: Insertion) -> str:
        """How the plan table names this placement at ``insertion`` (default: its name)."""
        return cls.name


def tensor_shape(node: fx.Node) -> tuple[int, ...]:
    """``node``'s traced shape; :class:`SiteError` when it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise SiteError(f"the value '{node.name}' at this site is not a single tensor")
    return tuple(meta.shape)


def site_device_dtype(gm: fx.GraphModule, site: str) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the site's parameters (or of the model's first parameter)."""
    for source in (gm.get_submodule(site) if has_module(gm, site) else None, gm):
        if source is None:
            continue
        for p in source.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


class ModuleTable(Mapping):
    """``dict(gm.named_modules())`` for lookups by name, each resolved when asked: listing every
    module of a deep model for each site made placing tuners quadratic in the model's size."""

    def __init__(self, gm: nn.Module):
        self._gm = gm

    def __getitem__(self, name: str) -> nn.Module:
        try:
            return self._gm.get_submodule(name)
        except AttributeError:
            raise KeyError(name) from None

    def __iter__(self):
        return (name for name, _ in self._gm.named_modules())

    def __len__(self) -> int:
        return sum(1 for _ in self._gm.modules())


def has_module(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def has_parameter(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_parameter(path)
        return True
    except AttributeError:
        return False


def build_units(gm: fx.GraphModule, insertion: Insertion) -> dict[str, nn.Module]:
    """One tuner unit per chunk label (or ``full``), on the site's device and dtype."""
    tuner_cls = tuners.get(insertion.tuner)
    device, dtype = site_device_dtype(gm, insertion.site)
    labels = insertion.chunks.labels if insertion.chunks else (FULL,)
    with torch.device(device):
        units = {label: tuner_cls.build(insertion.args, insertion.info) for label in labels}
    if dtype != torch.get_default_dtype():
        units = {label: unit.to(dtype) for label, unit in units.items()}
    return units


def shared_module(gm: fx.GraphModule, target: str, make: Callable[[], nn.Module]) -> nn.Module:
    """The module registered at ``target`` in ``gm``, or a new one from ``make()`` if there is none."""
    if has_module(gm, target):
        return gm.get_submodule(target)
    return make()


def add_node_after(gm: fx.GraphModule, anchor: fx.Node, target: str, module: nn.Module,
                   args: tuple, site: str, like: fx.Node) -> fx.Node:
    """Register ``module`` at ``target`` and call it right after ``anchor``; the new node carries
    the module stack of ``site`` and ``like``'s tensor metadata."""
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(anchor):
        node = gm.graph.call_module(target, args)
    node.meta["nn_module_stack"] = stack_up_to(like, site)
    if "tensor_meta" in like.meta:
        node.meta["tensor_meta"] = like.meta["tensor_meta"]
    return node
