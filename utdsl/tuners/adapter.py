"""``adapter``: a bottleneck MLP (Houlsby et al., 2019; AdaptFormer, Chen et al., 2022).

U(x) = scale * up(dropout(act(down(norm(x))))). With ``init="zero_up"`` (the default) the up
projection starts at zero, so the tuned model equals the base model at step 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from . import register
from .base import SiteInfo, Tuner, TunerArgs

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}


class AdapterArgs(TunerArgs):
    dim: int = Field(64, gt=0, description="bottleneck width")
    activation: Literal["relu", "gelu", "silu", "tanh", "identity"] = "relu"
    scale: float | Literal["learned"] = Field(1.0, description="output scale, or 'learned' (a trained scalar, init 1)")
    init: Literal["zero_up", "houlsby"] = Field(
        "zero_up", description="zero_up: kaiming down, zero up (identity at init); houlsby: both N(0, 1e-2)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    norm: bool = Field(False, description="LayerNorm on the adapter's input")


@register
class Adapter(Tuner):
    name = "adapter"
    Args = AdapterArgs
    placements = frozenset({"parallel", "sequential"})
    mergeable = frozenset()
    summary = "bottleneck MLP down-act-up with a fixed or learned scale; zero up-projection at init"

    def __init__(self, in_features: int, out_features: int, args: AdapterArgs):
        super().__init__()
        self.norm = nn.LayerNorm(in_features) if args.norm else nn.Identity()
        self.down = nn.Linear(in_features, args.dim, bias=args.bias)
        self.act = ACTIVATIONS[args.activation]()
        self.dropout = nn.Dropout(args.dropout) if args.dropout else nn.Identity()
        self.up = nn.Linear(args.dim, out_features, bias=args.bias)
        if args.scale == "learned":
            self.scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scale", torch.tensor(float(args.scale)), persistent=False)
        if args.init == "zero_up":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.down.weight, std=1e-2)
            nn.init.normal_(self.up.weight, std=1e-2)
        for linear in (self.down, self.up):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    @classmethod
    def build(cls, args: AdapterArgs, site: SiteInfo) -> "Adapter":
        return cls(site.in_features, site.out_features, args)

    @classmethod
    def identity_at_init(cls, args: AdapterArgs) -> bool:
        return args.init == "zero_up"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(self.norm(x))))) * self.scale

    @classmethod
    def mergeable_with(cls, args: AdapterArgs, placement: str) -> bool:
        """A linear adapter (RepAdapter-style: no activation, norm or dropout) folds; others do not."""
        return (placement in ("parallel", "sequential") and args.activation == "identity"
                and not args.norm and args.dropout == 0.0)

    def merge_linear(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(M, c) with U(x) = M x + c, M = s U D and c = s (U b_D + b_U), when U is affine in x
        (``activation=identity``, no norm, no dropout: RepAdapter-style), else None."""
        if not all(isinstance(m, nn.Identity) for m in (self.norm, self.act, self.dropout)):
            return None
        with torch.no_grad():
            mix = self.scale * (self.up.weight @ self.down.weight)
            shift = self.scale * self.up(self.down(self.down.weight.new_zeros(self.down.in_features)))
        return mix, shift
