"""``affine``: per-channel scale and shift, residual-free (SSF, Lian et al., 2022; IA3 with
``shift=false``, Liu et al., 2022). y = h * scale + shift; identity at init by default."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from . import register
from .base import SiteInfo, Tuner, TunerArgs


class AffineArgs(TunerArgs):
    scale: bool = Field(True, description="learn a per-channel scale")
    shift: bool = Field(True, description="learn a per-channel shift")
    init: Literal["identity", "normal"] = Field(
        "identity", description="identity: scale 1, shift 0; normal: N(1, std) and N(0, std) as SSF's code")
    std: float = Field(0.02, ge=0.0)

    @model_validator(mode="after")
    def _learns_something(self) -> "AffineArgs":
        if not (self.scale or self.shift):
            raise ValueError("affine needs scale=true or shift=true")
        return self


@register
class Affine(Tuner):
    name = "affine"
    Args = AffineArgs
    placements = frozenset({"sequential"})
    mergeable = frozenset({"sequential"})
    residual = False
    summary = "per-channel scale and shift (SSF; IA3 with shift=false); identity at init, mergeable"

    def __init__(self, features: int, args: AffineArgs):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features)) if args.scale else None
        self.shift = nn.Parameter(torch.zeros(features)) if args.shift else None
        if args.init == "normal":
            with torch.no_grad():
                if self.scale is not None:
                    self.scale.normal_(1.0, args.std)
                if self.shift is not None:
                    self.shift.normal_(0.0, args.std)

    @classmethod
    def build(cls, args: AffineArgs, site: SiteInfo) -> "Affine":
        return cls(site.out_features, args)

    @classmethod
    def identity_at_init(cls, args: AffineArgs) -> bool:
        return args.init == "identity" or args.std == 0.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.scale is not None and self.shift is not None:
            return torch.addcmul(self.shift, h, self.scale)  # one output tensor instead of two
        if self.scale is not None:
            h = h * self.scale
        if self.shift is not None:
            h = h + self.shift
        return h

    def merge_delta(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scale, shift) to fold into the op's output channels."""
        return self.scale, self.shift
