"""The channel joint that ``parallel`` and ``sequential`` share: a tuner joined to the one value h
that a site's region gives, on h's channel axis.

A joint holds one tuner unit per chunk of h's channels (a single unit, keyed ``full``, when the rule
names no chunks) and combines each with its chunk. Tuners work on the last axis; a joint moves a
channels-first value's channel axis there and back. The joint is called right after h, and every
use of h outside the region reads its result instead.

Invariants: the region's own nodes are untouched; the joint's node carries the site's module stack
and h's tensor metadata, so a later rule on an enclosing region wraps it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.fx as fx
from torch import nn

from ..layout import channel_axis
from ..resolve import Binding
from ..syntax import Chunks
from ..trace import Region
from ..tuners import SiteInfo
from .base import FULL, SiteError, add_node_after, build_units, shared_module, tensor_shape

if TYPE_CHECKING:
    from ..plan import Insertion

__all__ = ["Joint", "joined_output", "split_chunks", "insert_joint"]


class Joint(nn.Module):
    """Base of the joints: the units, the chunks they tune, and the channel axes."""

    def __init__(self, units: dict[str, nn.Module], chunk_indices: tuple[int, ...] | None,
                 chunk_count: int, in_axis: int, out_axis: int):
        super().__init__()
        self.units = nn.ModuleDict(units)
        self.chunk_indices = chunk_indices
        self.chunk_count = chunk_count
        self.in_axis = in_axis
        self.out_axis = out_axis

    def extra_repr(self) -> str:
        chunks = f", chunks={self.chunk_indices} of {self.chunk_count}" if self.chunk_indices else ""
        return f"in_axis={self.in_axis}, out_axis={self.out_axis}{chunks}"

    def _labelled_units(self):
        return zip(self.chunk_indices, self.units.values())

    def _combine(self, h: torch.Tensor, unit_out) -> torch.Tensor:
        """Apply ``unit_out(unit, h_chunk) -> new chunk`` to each tuned chunk of ``h``."""
        if self.out_axis != -1:
            h = h.movedim(self.out_axis, -1)
        if self.chunk_indices is None:
            y = unit_out(self.units[FULL], h)
        else:
            parts = list(h.chunk(self.chunk_count, dim=-1))
            for index, unit in self._labelled_units():
                parts[index] = unit_out(unit, parts[index])
            y = torch.cat(parts, dim=-1)
        return y.movedim(-1, self.out_axis) if self.out_axis != -1 else y

    def _combine_full(self, h: torch.Tensor, fn) -> torch.Tensor:
        """``fn(h)`` with h's channel axis last, moved back after."""
        if self.out_axis == -1:
            return fn(h)
        return fn(h.movedim(self.out_axis, -1)).movedim(-1, self.out_axis)


def joined_output(binding: Binding, found: Region, module: nn.Module | None) -> tuple[tuple[int, ...], int]:
    """The shape and channel axis of the one value the region gives."""
    if len(found.outputs) != 1:
        raise SiteError(f"this module's call produces {len(found.outputs)} values used later; "
                         f"{binding.rule.placement} needs exactly one")
    out_shape = tensor_shape(found.outputs[0])
    return out_shape, channel_axis(found.outputs[0], module, tuple(found.tensor_inputs))


def split_chunks(info: SiteInfo, chunks: Chunks | None, chunked_input: bool) -> SiteInfo:
    """``info`` for one chunk of the output channels (and of the input ones, if ``chunked_input``)."""
    if chunks is None:
        return info
    if info.out_features % chunks.count:
        raise SiteError(f"{info.out_features} output features do not split into {chunks.count} equal chunks")
    size = info.out_features // chunks.count
    in_features = size if chunked_input else info.in_features
    return SiteInfo(info.path, in_features, size, {**info.extras, "chunk_size": size})


def insert_joint(gm: fx.GraphModule, insertion: Insertion, found: Region,
                 make: Callable[..., Joint], inputs: tuple[fx.Node, ...]) -> fx.Node:
    """Call the joint ``make(units, chunk_indices=, chunk_count=, in_axis=, out_axis=)`` builds (or
    the one already registered) on (h, *inputs) right after h; uses of h outside the region read
    it. Returns the joint's node."""
    (h,) = found.outputs
    chunks = insertion.chunks
    layout = dict(chunk_indices=chunks.indices if chunks else None,
                  chunk_count=chunks.count if chunks else 1,
                  in_axis=insertion.in_axis, out_axis=insertion.out_axis)
    joint = shared_module(gm, insertion.module_name, lambda: make(build_units(gm, insertion), **layout))
    inside = set(found.nodes)
    outside_users = [user for user in h.users if user not in inside]
    y = add_node_after(gm, h, insertion.module_name, joint, (h, *inputs), insertion.site, h)
    for user in outside_users:
        user.replace_input_with(h, y)
    return y
