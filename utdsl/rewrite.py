"""Stage ``rewrite``: a traced GraphModule + a :class:`~utdsl.plan.Plan` -> the same GraphModule
with every tuner inserted, each by its placement's ``insert`` (:mod:`utdsl.placements`).

Each insertion registers its tuner module under ``Insertion.module_name`` (a tree apart from the
base modules, so base weights keep their names) and adds nodes after the site's region, following
the fx recipe: ``inserting_after``, ``call_module``, ``replace_all_uses_with``, then ``lint`` and
``recompile``. Regions are looked up again before every insertion and inserted nodes carry the
site's module stack, so stacked and nested rules compose in plan order. At a module used
functionally (its weight read by an ``F.linear``, see :func:`utdsl.trace.region`) the tuner goes
after that call, and inserted nodes carry the site with the type ``FunctionalUse``.

A tuner already registered at its insertion's ``module_name`` is reused rather than built again
(:func:`utdsl.placements.base.shared_module`): ``compile`` rewrites the same plan into a model's
train graph and its eval graph, and both must call the same tuner instances.
"""

from __future__ import annotations

import torch.fx as fx

from . import placements
from .plan import Plan
from .trace import indexed_regions, region

__all__ = ["rewrite"]


def rewrite(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Insert every tuner of ``plan`` into ``gm`` (in place) and return it, linted and recompiled."""
    with indexed_regions(gm):
        for insertion in plan.insertions:
            found = region(gm.graph, insertion.site)
            placements.get(insertion.placement).insert(gm, insertion, found)
    for name in dict.fromkeys(i.placement for i in plan.insertions):
        placements.get(name).finish(gm)
    gm.graph.lint()
    gm.recompile()
    return gm
