"""The modules ``rewrite`` inserts for the ``parallel`` and ``sequential`` placements.

A joint holds one tuner unit per chunk of the site's output (a single unit, keyed ``full``, when
the rule names no chunks) and combines it with the frozen operation's output ``h``:

- :class:`ParallelJoint`: y = h + U(x), chunk by chunk;
- :class:`SequentialJoint`: y = h + U(h), or U(h) for residual-free tuners.

Tuners work on the last axis; a joint moves a channels-first value's channel axis there and back,
except for a unit marked ``native_layout`` (a conv-shaped lowrank), which takes x as the site does.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ParallelJoint", "SequentialJoint", "FULL"]

FULL = "full"


class _Joint(nn.Module):
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
        """Apply ``unit_out(index, unit, h_chunk) -> new chunk`` to each tuned chunk of ``h``."""
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


class ParallelJoint(_Joint):
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

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self._native:
            return h + self.units[FULL](x)
        if self.in_axis != -1:
            x = x.movedim(self.in_axis, -1)
        if self._fused is not None:
            delta = self._fused(list(self.units.values()), self.chunk_indices, self.chunk_count, x)
            if delta is not None:
                return h + (delta.movedim(-1, self.out_axis) if self.out_axis != -1 else delta)
        return self._combine(h, lambda unit, part: part + unit(x))


class SequentialJoint(_Joint):
    """y = h + U(h), or U(h) when the tuner is residual-free (per chunk)."""

    def __init__(self, *args, residual: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual = residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return self._combine(h, lambda unit, part: part + unit(part))
        return self._combine(h, lambda unit, part: unit(part))
