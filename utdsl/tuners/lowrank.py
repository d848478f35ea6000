"""``lowrank``: LoRA (Hu et al., 2021). U(x) = (alpha / r) * B(A(dropout(x))), B zero at init.

On a site that is one ``nn.Conv2d`` call the update is conv-shaped, as peft's LoRA ``Conv2d``:
A is a conv with the site's kernel, stride, padding and dilation to r channels, B a 1x1 conv
(:class:`ConvLowRank`), so strided and downsampling convs take LoRA too and ΔW = B ∘ A folds
into the conv's weight."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from . import register
from .base import SiteInfo, Tuner, TunerArgs


class LowRankArgs(TunerArgs):
    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float | None = Field(None, gt=0, description="scaling numerator; alpha / r scales U (default: r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")
    init: Literal["kaiming", "gaussian"] = Field("kaiming", description="initialisation of A (B is zero)")


def _init_low_rank(unit: nn.Module, args: LowRankArgs) -> None:
    """The paper's init of ``unit.down``/``unit.up`` (B zero), its dropout and its scaling alpha / r."""
    unit.dropout = nn.Dropout(args.dropout) if args.dropout else nn.Identity()
    unit.scaling = (args.alpha if args.alpha is not None else args.r) / args.r
    if args.init == "kaiming":
        nn.init.kaiming_uniform_(unit.down.weight, a=math.sqrt(5))
    else:
        nn.init.normal_(unit.down.weight, std=1.0 / args.r)
    nn.init.zeros_(unit.up.weight)


@register
class LowRank(Tuner):
    name = "lowrank"
    Args = LowRankArgs
    placements = frozenset({"parallel"})
    mergeable = frozenset({"parallel"})
    summary = "LoRA: low-rank update B·A scaled by alpha/r; zero at init, mergeable into a linear or conv"
    #: on a Conv2d site (``site.extras["conv"]``) it builds a :class:`ConvLowRank`
    conv_sites = True

    def __init__(self, in_features: int, out_features: int, args: LowRankArgs):
        super().__init__()
        self.down = nn.Linear(in_features, args.r, bias=False)
        self.up = nn.Linear(args.r, out_features, bias=False)
        _init_low_rank(self, args)

    @classmethod
    def build(cls, args: LowRankArgs, site: SiteInfo) -> "LowRank | ConvLowRank":
        conv = site.extras.get("conv")
        if conv is None:
            return cls(site.in_features, site.out_features, args)
        if "chunk_size" in site.extras:
            raise ValueError("a conv site's output cannot be split into chunks")
        return ConvLowRank(site.in_features, site.out_features, conv, args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scaling the r-wide bottleneck, not the output, saves a pass over the output
        return self.up(self.down(self.dropout(x)) * self.scaling)

    @staticmethod
    def chunked_delta(units: list["LowRank"], indices: tuple[int, ...], count: int,
                      x: torch.Tensor) -> torch.Tensor | None:
        """The update of every chunk at once, full width: x A^T B^T with A the units' down
        projections stacked and B block-diagonal over the tuned chunks (zero rows elsewhere).
        None when a unit has dropout (each unit draws its own mask)."""
        if any(not isinstance(u.dropout, nn.Identity) for u in units):
            return None
        ranks = [u.down.out_features for u in units]
        size = units[0].up.out_features
        down = torch.cat([u.down.weight * u.scaling for u in units])        # (sum r, in)
        up = units[0].up.weight.new_zeros(size * count, sum(ranks))
        column = 0
        for index, unit, rank in zip(indices, units, ranks):
            up[index * size:(index + 1) * size, column:column + rank] = unit.up.weight
            column += rank
        return nn.functional.linear(nn.functional.linear(x, down), up)

    @staticmethod
    def add_into_(units: list["LowRank"], indices: tuple[int, ...] | None, count: int,
                  x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h += the units' update, in place, chunk by chunk (``indices`` None: one unit, all of h):
        one x A^T for every unit's A stacked, then an ``addmm_`` of each chunk's B into its slice
        of h. For inference only (no autograd, no dropout); returns h."""
        h2 = h.view(-1, h.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(h.dtype)
        down = units[0].down.weight if len(units) == 1 else torch.cat([u.down.weight for u in units])
        a = x2 @ down.to(h.dtype).t()
        size = h.shape[-1] // count
        column = 0
        for index, unit in zip(indices if indices is not None else (0,), units):
            rank = unit.down.out_features
            h2[:, index * size:(index + 1) * size].addmm_(a[:, column:column + rank],
                                                           unit.up.weight.to(h.dtype).t(), alpha=unit.scaling)
            column += rank
        return h

    def merge_delta(self) -> torch.Tensor:
        """ΔW (out, in) to add to the tuned linear's weight."""
        return (self.up.weight @ self.down.weight) * self.scaling


class ConvLowRank(nn.Module):
    """LoRA on a Conv2d (peft's formula): U(x) = (alpha / r) * up(down(dropout(x))) with down a
    conv in -> r of the site's kernel, stride, padding and dilation (groups 1, no bias) and up a
    1x1 conv r -> out, zero at init. Works on the site's own NCHW layout (``native_layout``)."""

    native_layout = True

    def __init__(self, in_channels: int, out_channels: int, conv: dict, args: LowRankArgs):
        super().__init__()
        self.down = nn.Conv2d(in_channels, args.r, conv["kernel_size"], conv["stride"], conv["padding"],
                              conv["dilation"], bias=False, padding_mode=conv.get("padding_mode", "zeros"))
        self.up = nn.Conv2d(args.r, out_channels, 1, bias=False)
        _init_low_rank(self, args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(self.dropout(x)) * self.scaling)

    def merge_delta(self) -> torch.Tensor:
        """ΔW (out, in, kh, kw) to add to the tuned conv's weight (a conv with groups=1)."""
        down = self.down.weight
        delta = self.up.weight.flatten(1) @ down.flatten(1)
        return delta.view(-1, *down.shape[1:]) * self.scaling
