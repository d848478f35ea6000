"""The placements of the U-Tuning model: how a tuner U joins the frozen operation OP.

| name | meaning (h = OP(x)) |
|---|---|
| parallel | y = h + U(x) |
| sequential | y = h + U(h), or y = U(h) for residual-free tuners (affine) |
| prompt | tokens joined to the region's input, removed at its output |
| prefix | learned keys/values joined to K and V inside the region's attention |
| weight | W' = U(W) used wherever W is read; merges exactly (W := U(W)) |
| side | a chain over detached values of the sites, injected at a later module's input (``at``) |

The placement registry: one module per placement, owning its planning step (``analyze``), its
rewriting step (``insert``) and the modules it inserts; a new placement is a new module with a
:class:`Placement` subclass, registered below (the order of registration is the order of
:data:`PLACEMENTS`). Stage ``plan`` and stage ``rewrite`` look a rule's placement up here by name.
"""

from __future__ import annotations

from .base import Placement, SiteError
from .parallel import Parallel
from .prefix import Prefix
from .prompt import Prompt
from .sequential import Sequential
from .side import Side
from .weight import Weight

__all__ = ["Placement", "SiteError", "register", "get", "PLACEMENTS", "REGISTRY"]

REGISTRY: dict[str, type[Placement]] = {}


def register(cls: type[Placement]) -> type[Placement]:
    """Add a placement to the registry under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"placement {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Placement] | None:
    return REGISTRY.get(name)


for _placement in (Parallel, Sequential, Prompt, Prefix, Weight, Side):
    register(_placement)

PLACEMENTS: tuple[str, ...] = tuple(REGISTRY)
"""The placement names, in registration order."""
