"""The ``parallel`` placement: y = h + U(x), a tuner beside the frozen operation h = OP(x).

Input: a site whose region takes one tensor x and gives one value h that keeps x's shape but for
the channel axis (or a Conv2d site, for a tuner with ``conv_sites``: a conv-shaped update of any
geometry). Output: a :class:`ParallelJoint` called on (h, x) right after h; every use of h outside
the region reads y = h + U(x), per chunk y_c = h_c + U_c(x) when the rule names chunks of h's
channels (each unit maps all of x's channels to one chunk).

Invariants: those of :mod:`utdsl.placements.joint`; x itself is not changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from .. import tuners
from ..layout import channel_axis
from ..resolve import Binding
from ..trace import Region
from ..tuners import SiteInfo
from .base import FULL, Placement, SiteError, tensor_shape
from .joint import Joint, insert_joint, joined_output, split_chunks

if TYPE_CHECKING:
    from ..plan import Insertion

__all__ = ["Parallel", "ParallelJoint"]


class ParallelJoint(Joint):
    """y = h + U(x) (per chunk: y_c = h_c + U_c(x)).

    When the tuner class offers ``chunked_delta(units, indices, count, x)`` (a full-width update
    computed at once, e.g. lowrank's block matrices), chunked sites use it: one add on ``h`` instead
    of splitting and re-joining the output."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unit = next(iter(self.units.values()))
        fused = getattr(type(unit), "chunked_delta", None)
        self._fused = fused if self.chunk_indices is not None else None
        # a unit in the site's own layout (a conv-shaped lowrank) maps x to h's shape itself
        self._native = bool(getattr(unit, "native_layout", False)) and self.chunk_indices is None
        self._add_into = None if getattr(unit, "native_layout", False) else getattr(type(unit), "add_into_", None)

    def forward(self, h: torch.Tensor, x: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        # ``fresh``: h is a linear's own output that nothing else reads (``Parallel.insert`` checks
        # the graph), so without autograd the update may be added into it in place
        if fresh and self._add_into is not None and not self.training and not torch.is_grad_enabled() \
                and self.in_axis == -1 and self.out_axis == -1 and h.is_contiguous():
            return self._add_into(list(self.units.values()), self.chunk_indices, self.chunk_count, x, h)
        if self._native:
            return h + self.units[FULL](x)
        if self.in_axis != -1:
            x = x.movedim(self.in_axis, -1)
        if self._fused is not None:
            delta = self._fused(list(self.units.values()), self.chunk_indices, self.chunk_count, x)
            if delta is not None:
                return h + (delta.movedim(-1, self.out_axis) if self.out_axis != -1 else delta)
        return self._combine(h, lambda unit, part: part + unit(x))


class Parallel(Placement):
    name = "parallel"
    summary = "y = h + U(x)"

    @classmethod
    def analyze(cls, binding: Binding, found: Region, module: nn.Module | None,
                gm: fx.GraphModule) -> tuple[SiteInfo, int, int]:
        out_shape, out_axis = joined_output(binding, found, module)
        inputs = found.tensor_inputs
        if len(inputs) != 1:
            names = ", ".join(n.name for n in inputs) or "none"
            raise SiteError(f"parallel needs exactly one tensor input, this module takes {len(inputs)} ({names})")
        in_shape = tensor_shape(inputs[0])
        in_axis = channel_axis(inputs[0], module, tuple(found.outputs))
        extras: dict[str, Any] = {"in_shape": in_shape, "out_shape": out_shape}
        conv = _leaf_conv(found, module, inputs[0])
        if conv is not None:
            extras["conv"] = conv
        _check_maps_shape(binding.rule.tuner.name, in_shape, in_axis, out_shape, out_axis, conv is not None)
        info = SiteInfo(binding.path, in_shape[in_axis], out_shape[out_axis], extras)
        return split_chunks(info, binding.chunks, chunked_input=False), in_axis, out_axis

    @classmethod
    def insert(cls, gm: fx.GraphModule, insertion: Insertion, found: Region) -> None:
        (x,) = found.tensor_inputs
        (h,) = found.outputs
        node = insert_joint(gm, insertion, found, ParallelJoint, (x,))
        if _fresh_linear_output(gm, found, h):
            node.kwargs = {"fresh": True}


def _fresh_linear_output(gm: fx.GraphModule, found: Region, h: fx.Node) -> bool:
    """Whether the site is one linear call whose output only the joint reads (then nothing keeps
    it for a backward, and inference may add into it in place)."""
    if len(found.nodes) != 1 or found.nodes[0] is not h or len(h.users) != 1:
        return False
    if h.op == "call_module":
        return type(gm.get_submodule(h.target)) is nn.Linear
    return h.op == "call_function" and h.target is torch.nn.functional.linear


def _leaf_conv(found: Region, module: nn.Module | None, x: fx.Node) -> dict[str, Any] | None:
    """The geometry of a site that is one call of an ``nn.Conv2d`` on ``x``, else None."""
    if not isinstance(module, torch.nn.Conv2d) or len(found.nodes) != 1:
        return None
    (node,) = found.nodes
    if node.op != "call_module" or node.args[:1] != (x,):
        return None
    return {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
            "dilation": module.dilation, "groups": module.groups, "padding_mode": module.padding_mode}


def _check_maps_shape(tuner: str, in_shape, in_axis: int, out_shape, out_axis: int, conv: bool) -> None:
    """A parallel tuner maps channels to channels, position by position: the site must keep every
    other axis, unless the tuner makes a conv-shaped update of a conv site."""
    def others(shape, axis):
        return [size for i, size in enumerate(shape) if i != axis % len(shape)]

    if len(in_shape) == len(out_shape) and others(in_shape, in_axis) == others(out_shape, out_axis):
        return
    if conv and getattr(tuners.get(tuner), "conv_sites", False):
        return
    shapes = " -> ".join("x".join(map(str, s)) for s in (in_shape, out_shape))
    raise SiteError(f"parallel {tuner} maps channels position by position, but this module changes "
                    f"the shape of its value ({shapes})",
                    "attach it `sequential` (on the output), pick a site that keeps the shape, or use "
                    "`parallel lowrank` on a Conv2d (a conv-shaped update)")
