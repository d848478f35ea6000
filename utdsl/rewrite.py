"""Stage ``rewrite``: a traced GraphModule + a :class:`~utdsl.plan.Plan` -> the same GraphModule
with every tuner inserted. The only module that edits graphs.

Each insertion registers its tuner module under ``Insertion.module_name`` (a tree apart from the
base modules, so base weights keep their names) and adds nodes after the site's region, following
the fx recipe: ``inserting_after``, ``call_module``, ``replace_all_uses_with``, then ``lint`` and
``recompile``. Regions are looked up again before every insertion and inserted nodes carry the
site's module stack, so stacked and nested rules compose in plan order. At a module used
functionally (its weight read by an ``F.linear``, see :func:`utdsl.trace.region`) the tuner goes
after that call, and inserted nodes carry the site with the type ``FunctionalUse``.

A tuner already registered at its insertion's ``module_name`` is reused rather than built again
(:func:`shared_module`): ``compile`` rewrites the same plan into a model's train graph and its eval
graph, and both must call the same tuner instances.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from . import tuners
from .joints import FULL, ParallelJoint, SequentialJoint
from .plan import Insertion, Plan
from .trace import Region, region, stack_up_to

__all__ = ["rewrite", "INSERTERS", "add_node_after", "build_units", "shared_module"]


def rewrite(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Insert every tuner of ``plan`` into ``gm`` (in place) and return it, linted and recompiled."""
    for insertion in plan.insertions:
        found = region(gm.graph, insertion.site)
        INSERTERS[insertion.placement](gm, insertion, found)
    gm.graph.lint()
    gm.recompile()
    return gm


def site_device_dtype(gm: fx.GraphModule, site: str) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the site's parameters (or of the model's first parameter)."""
    for source in (gm.get_submodule(site) if _has_module(gm, site) else None, gm):
        if source is None:
            continue
        for p in source.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _has_module(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def build_units(gm: fx.GraphModule, insertion: Insertion) -> dict[str, nn.Module]:
    """One tuner unit per chunk label (or ``full``), on the site's device and dtype."""
    tuner_cls = tuners.get(insertion.tuner)
    device, dtype = site_device_dtype(gm, insertion.site)
    labels = insertion.chunks.labels if insertion.chunks else (FULL,)
    with torch.device(device):
        return {label: tuner_cls.build(insertion.args, insertion.info).to(dtype) for label in labels}


def shared_module(gm: fx.GraphModule, target: str, make: Callable[[], nn.Module]) -> nn.Module:
    """The module registered at ``target`` in ``gm``, or a new one from ``make()`` if there is none."""
    if _has_module(gm, target):
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


def _insert_joint(gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
    (h,) = found.outputs
    chunks = insertion.chunks
    common = dict(chunk_indices=chunks.indices if chunks else None,
                  chunk_count=chunks.count if chunks else 1,
                  in_axis=insertion.in_axis, out_axis=insertion.out_axis)
    if insertion.placement == "parallel":
        (x,) = found.tensor_inputs
        joint = shared_module(gm, insertion.module_name,
                              lambda: ParallelJoint(build_units(gm, insertion), **common))
        args: tuple = (h, x)
    else:
        residual = tuners.get(insertion.tuner).residual
        joint = shared_module(gm, insertion.module_name,
                              lambda: SequentialJoint(build_units(gm, insertion), residual=residual, **common))
        args = (h,)
    inside = set(found.nodes)
    outside_users = [user for user in h.users if user not in inside]
    y = add_node_after(gm, h, insertion.module_name, joint, args, insertion.site, h)
    for user in outside_users:
        user.replace_input_with(h, y)


#: placement name -> function(gm, insertion, region) that inserts it
INSERTERS: dict[str, Callable[[fx.GraphModule, Insertion, Region], None]] = {
    "parallel": _insert_joint,
    "sequential": _insert_joint,
}
