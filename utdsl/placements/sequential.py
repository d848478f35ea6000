"""The ``sequential`` placement: y = h + U(h), or y = U(h) for a residual-free tuner (affine), a
tuner after the frozen operation h = OP(x).

Input: a site whose region gives one tensor h that later nodes use (any inputs). Output: a
:class:`SequentialJoint` called on h right after it; every use of h outside the region reads y,
per chunk y_c = h_c + U_c(h_c) (or U_c(h_c)) when the rule names chunks of h's channels, the
other chunks passing unchanged.

Invariants: those of :mod:`utdsl.placements.joint`; the tuner reads only h.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn

from .. import tuners
from ..resolve import Binding
from ..trace import Region
from ..tuners import SiteInfo
from .base import Placement
from .joint import Joint, insert_joint, joined_output, split_chunks

if TYPE_CHECKING:
    from ..plan import Insertion

__all__ = ["Sequential", "SequentialJoint"]


class SequentialJoint(Joint):
    """y = h + U(h), or U(h) when the tuner is residual-free (per chunk)."""

    def __init__(self, *args, residual: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual = residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return self._combine(h, lambda unit, part: part + unit(part))
        return self._combine(h, lambda unit, part: unit(part))


class Sequential(Placement):
    name = "sequential"
    summary = "y = h + U(h), or y = U(h) for residual-free tuners (affine)"

    @classmethod
    def analyze(cls, binding: Binding, found: Region, module: nn.Module | None,
                gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
        shape, axis = joined_output(binding, found, module)
        info = SiteInfo(binding.path, shape[axis], shape[axis], {"in_shape": shape, "out_shape": shape})
        return split_chunks(info, binding.chunks, chunked_input=True), axis, axis

    @classmethod
    def insert(cls, gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
        residual = tuners.get(insertion.tuner).residual
        insert_joint(gm, insertion, found, functools.partial(SequentialJoint, residual=residual), ())
