"""``mona``: the multi-cognitive visual adapter (Mona; Yin et al., "5%>100%", CVPR 2025).

U(h) = up(dropout(gelu(M(down(norm(h) * gamma + h * gamma_x))))), used sequentially (y = h + U(h),
Mona's own skip). ``gamma`` (init 1e-6) and ``gamma_x`` (init 1) scale the layer-normed and the
raw input per channel. M works on the patch tokens reshaped to their H x W grid
(:mod:`utdsl.tuners.grid`): m = z + (dw3(z) + dw5(z) + dw7(z)) / 3, then m + proj(m), with
depthwise 3x3, 5x5 and 7x7 convolutions and a 1x1 projection. Prefix tokens skip M
(``prefix=pass``; Mona's Swin has none) or go through it as 1x1 maps (``prefix=conv1x1``). The
projections keep PyTorch's default init, as Mona's code does: not the identity at init.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from . import register
from .base import TunerArgs
from .grid import GridTuner

KERNELS = (3, 5, 7)


class MonaArgs(TunerArgs):
    dim: int = Field(64, gt=0, description="bottleneck channels")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout before the up projection")
    prefix: Literal["pass", "conv1x1"] = Field("pass", description="prefix tokens around the grid op, or through it as 1x1 maps")


class MultiCognitive(nn.Module):
    """m = z + mean of depthwise k x k convolutions (k = 3, 5, 7); m + proj(m) (NCHW)."""

    def __init__(self, channels: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels) for k in KERNELS)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        m = z + sum(conv(z) for conv in self.convs) / len(self.convs)
        return m + self.proj(m)


@register
class Mona(GridTuner):
    name = "mona"
    Args = MonaArgs
    placements = frozenset({"sequential", "parallel"})
    summary = "Mona: scaled layer norm, down, multi-scale depthwise convs on the patch grid, gelu, up"

    def __init__(self, in_features: int, out_features: int, args: MonaArgs,
                 grid: tuple[int, int] | None, prefix_tokens: int):
        super().__init__(grid, prefix_tokens, args.prefix)
        self.norm = nn.LayerNorm(in_features)
        self.gamma = nn.Parameter(torch.full((in_features,), 1e-6))
        self.gamma_x = nn.Parameter(torch.ones(in_features))
        self.down = nn.Linear(in_features, args.dim)
        self.grid_op = MultiCognitive(args.dim)
        self.dropout = nn.Dropout(args.dropout) if args.dropout else nn.Identity()
        self.up = nn.Linear(args.dim, out_features)

    @classmethod
    def identity_at_init(cls, args: MonaArgs) -> bool:
        return False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.down(self.norm(h) * self.gamma + h * self.gamma_x)
        z = self.on_grid(z, self.grid_op)
        return self.up(self.dropout(F.gelu(z)))
