"""The placements of the U-Tuning model: how a tuner U joins the frozen operation OP.

| name | meaning (h = OP(x)) |
|---|---|
| parallel | y = h + U(x) |
| sequential | y = h + U(h), or y = U(h) for residual-free tuners (affine) |
| prompt | tokens joined to the region's input, removed at its output |
| prefix | learned keys/values joined to K and V inside the region's attention |
"""

from __future__ import annotations

__all__ = ["PLACEMENTS"]

PLACEMENTS: tuple[str, ...] = ("parallel", "sequential", "prompt", "prefix")
