"""``conv_adapter``: a convolutional bypass on the token grid (Convpass, Jie & Deng, 2022).

U(x) = scale * up(dropout(act(conv(act(down(x)))))), where ``conv`` is a k x k convolution (full,
or depthwise) over the patch tokens reshaped to their H x W grid (:mod:`utdsl.tuners.grid`).
Prefix tokens (cls, distillation, registers) go through the convolution as 1x1 maps, as
Convpass's code does with the cls token (``prefix=conv1x1``: the centre tap and bias), or skip it
(``prefix=pass``). Convpass's init: xavier-uniform down, the conv the identity (zero but a unit
centre tap, ``init=identity``) or xavier-uniform (``init=xavier``), zero up and zero biases, so
the tuned model equals the base model at step 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from . import register
from .base import TunerArgs
from .grid import GridTuner


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x) (CLIP's GELU approximation; Convpass's activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU, "relu": nn.ReLU, "identity": nn.Identity}


class ConvAdapterArgs(TunerArgs):
    dim: int = Field(8, gt=0, description="bottleneck channels")
    kernel: int = Field(3, gt=0, description="odd kernel size of the grid convolution")
    depthwise: bool = Field(False, description="a depthwise convolution instead of a full one")
    activation: Literal["quick_gelu", "gelu", "relu", "identity"] = "quick_gelu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the up projection")
    scale: float = Field(1.0, description="output scale s")
    init: Literal["identity", "xavier"] = Field("identity", description="the grid convolution's init")
    prefix: Literal["conv1x1", "pass"] = Field(
        "conv1x1", description="prefix tokens through the convolution as 1x1 maps, or around it")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, kernel: int) -> int:
        if kernel % 2 == 0:
            raise ValueError("the kernel size must be odd (the grid keeps its size)")
        return kernel


@register
class ConvAdapter(GridTuner):
    name = "conv_adapter"
    Args = ConvAdapterArgs
    placements = frozenset({"parallel", "sequential"})
    summary = "Convpass: down, k x k conv on the patch grid, up; prefix tokens as 1x1 maps; zero up at init"

    def __init__(self, in_features: int, out_features: int, args: ConvAdapterArgs,
                 grid: tuple[int, int] | None, prefix_tokens: int):
        super().__init__(grid, prefix_tokens, args.prefix)
        self.down = nn.Linear(in_features, args.dim)
        self.conv = nn.Conv2d(args.dim, args.dim, args.kernel, padding=args.kernel // 2,
                              groups=args.dim if args.depthwise else 1)
        self.act = ACTIVATIONS[args.activation]()
        self.dropout = nn.Dropout(args.dropout) if args.dropout else nn.Identity()
        self.up = nn.Linear(args.dim, out_features)
        self.scale = args.scale
        nn.init.xavier_uniform_(self.down.weight)
        if args.init == "identity":
            with torch.no_grad():
                self.conv.weight.zero_()
                centre = args.kernel // 2
                channels = torch.arange(args.dim)
                self.conv.weight[channels, 0 if args.depthwise else channels, centre, centre] = 1.0
        else:
            nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.up.weight)
        for bias in (self.down.bias, self.conv.bias, self.up.bias):
            nn.init.zeros_(bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.on_grid(self.act(self.down(x)), self.conv)
        return self.up(self.dropout(self.act(z))) * self.scale
