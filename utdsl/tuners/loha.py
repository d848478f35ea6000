"""``loha``: LoHa, low-rank Hadamard product (Hyeon-Woo et al., 2022, FedPara; LyCORIS):

    W' = W + (alpha / r) (w1_a w1_b) ⊙ (w2_a w2_b)

with w1_a, w2_a (out, r) and w1_b, w2_b (r, in); the update has rank up to r². Init as peft's
``LoHaLayer.reset_adapter_parameters``: w1_a, w1_b, w2_a kaiming-uniform (a = sqrt 5), w2_b zero,
so W' == W at init. A conv weight is seen as (out, in/groups * kh * kw), peft's flattened conv
LoHa; peft's ``use_effective_conv2d`` (Tucker cores) and rank/module dropout are not offered.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from . import register
from .base import SiteInfo, TunerArgs
from .weight_base import WeightTuner, as_matrix, cast_like, kaiming_, weight_shape

__all__ = ["LoHaArgs", "LoHa"]


class LoHaArgs(TunerArgs):
    r: int = Field(8, gt=0, le=65536, description="rank of each Hadamard factor")
    alpha: float = Field(8.0, gt=0, le=1e6, allow_inf_nan=False, description="ΔW is scaled by alpha / r")


@register
class LoHa(WeightTuner):
    name = "loha"
    Args = LoHaArgs
    summary = "LoHa: (alpha/r) (w1_a w1_b) ⊙ (w2_a w2_b) added to W; w2_b zero at init"

    def __init__(self, shape: tuple[int, ...], args: LoHaArgs):
        super().__init__()
        rows, columns = as_matrix(shape)
        self.hada_w1_a = nn.Parameter(kaiming_(torch.empty(rows, args.r)))
        self.hada_w1_b = nn.Parameter(kaiming_(torch.empty(args.r, columns)))
        self.hada_w2_a = nn.Parameter(kaiming_(torch.empty(rows, args.r)))
        self.hada_w2_b = nn.Parameter(torch.zeros(args.r, columns))
        self.scaling = args.alpha / args.r

    @classmethod
    def build(cls, args: LoHaArgs, site: SiteInfo, shared: nn.Module | None = None) -> "LoHa":
        return cls(weight_shape(site), args)

    def forward(self, weight: Tensor) -> Tensor:
        delta = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling
        return weight + cast_like(delta.view(weight.shape), weight)
