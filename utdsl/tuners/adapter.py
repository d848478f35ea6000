"""``adapter``: a bottleneck MLP (Houlsby et al., 2019; AdaptFormer, Chen et al., 2022).

U(x) = scale * drop_path(up(dropout(act(down(norm(x)))))). With ``init="zero_up"`` (the default)
the up projection starts at zero, so the tuned model equals the base model at step 0. Adapter+
(Steitz & Roth, 2024) is ``scale=channel`` (a learned vector, ones at init), ``init=houlsby`` and
``drop_path`` (stochastic depth on the adapter branch: in training, each sample's U(x) is dropped
with that probability and the others scaled by 1 / (1 - p)).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from timm.layers import DropPath
from torch import nn

from . import register
from .base import SiteInfo, Tuner, TunerArgs

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}


class AdapterArgs(TunerArgs):
    dim: int = Field(64, gt=0, description="bottleneck width")
    activation: Literal["relu", "gelu", "silu", "tanh", "identity"] = "relu"
    scale: float | Literal["learned", "channel"] = Field(
        1.0, description="output scale, or 'learned' (a trained scalar, init 1), or 'channel' (a trained "
                         "vector, one per output channel, init 1: Adapter+)")
    init: Literal["zero_up", "houlsby", "xavier"] = Field(
        "zero_up", description="zero_up: kaiming down, zero up (identity at init); houlsby: both N(0, 1e-2) "
                               "truncated at 2 std; xavier: xavier-uniform down, zero up (identity at init)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    norm: bool = Field(False, description="LayerNorm on the adapter's input")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth on the adapter's output (per sample)")


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
        self.drop_path = DropPath(args.drop_path) if args.drop_path else nn.Identity()
        if args.scale == "learned":
            self.scale = nn.Parameter(torch.ones(1))
        elif args.scale == "channel":
            self.scale = nn.Parameter(torch.ones(out_features))
        else:
            self.register_buffer("scale", torch.tensor(float(args.scale)), persistent=False)
        if args.init == "houlsby":  # near zero: N(0, 0.01) truncated at 2 std (Adapter+'s code)
            for linear in (self.down, self.up):
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
        else:
            if args.init == "xavier":  # Hydra's and Convpass's down projection
                nn.init.xavier_uniform_(self.down.weight)
            else:
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        for linear in (self.down, self.up):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    @classmethod
    def build(cls, args: AdapterArgs, site: SiteInfo) -> "Adapter":
        return cls(site.in_features, site.out_features, args)

    @classmethod
    def identity_at_init(cls, args: AdapterArgs) -> bool:
        return args.init != "houlsby"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.up(self.dropout(self.act(self.down(self.norm(x)))))) * self.scale

    @classmethod
    def mergeable_with(cls, args: AdapterArgs, placement: str) -> bool:
        """A linear adapter (RepAdapter-style: no activation, norm or dropout) folds; others do not."""
        return (placement in ("parallel", "sequential") and args.activation == "identity"
                and not args.norm and args.dropout == 0.0 and args.drop_path == 0.0)

    def merge_linear(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(M, c) with U(x) = M x + c, M = s U D and c = s (U b_D + b_U), when U is affine in x
        (``activation=identity``, no norm, no dropout: RepAdapter-style), else None."""
        if not all(isinstance(m, nn.Identity) for m in (self.norm, self.act, self.dropout, self.drop_path)):
            return None
        with torch.no_grad():
            mix = self.scale.reshape(-1, 1) * (self.up.weight @ self.down.weight)  # scalar or per channel
            shift = self.scale * self.up(self.down(self.down.weight.new_zeros(self.down.in_features)))
        return mix, shift
