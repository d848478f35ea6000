"""``loha``: LoHa, low-rank Hadamard product (Hyeon-Woo et al., 2022, FedPara; LyCORIS):

    W' = W + (alpha / r) (w1_a w1_b) ⊙ (w2_a w2_b)

with w1_a, w2_a (out, r) and w1_b, w2_b (r, in); the update has rank up to r². Init as peft's
``LoHaLayer.reset_adapter_parameters``: w1_a, w1_b, w2_a kaiming-uniform (a = sqrt 5), w2_b zero,
so W' == W at init. A conv weight is seen as (out, in/groups * kh * kw), peft's flattened conv
LoHa; peft's ``use_effective_conv2d`` (Tucker cores) and rank/module dropout are not offered.

The product is a :class:`HadamardProduct` autograd function that keeps only the four factors and
rebuilds the two (out, in) products in the backward, as peft's ``HadaWeight``: autograd's own
product would keep both for the whole step.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from . import register
from .base import SiteInfo, TunerArgs
from .weight_base import WeightTuner, as_matrix, cast_like, kaiming_, weight_shape

__all__ = ["LoHaArgs", "LoHa", "HadamardProduct"]


class HadamardProduct(torch.autograd.Function):
    """(w1_a w1_b) ⊙ (w2_a w2_b) · scale, saving the factors only (exact gradients)."""

    @staticmethod
    def forward(ctx, w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        ctx.scale = scale
        return (w1_a @ w1_b) * (w2_a @ w2_b) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        grad = grad * ctx.scale
        through_1 = grad * (w2_a @ w2_b)          # dL/d(w1_a w1_b)
        through_2 = grad * (w1_a @ w1_b)          # dL/d(w2_a w2_b)
        return (through_1 @ w1_b.T, w1_a.T @ through_1, through_2 @ w2_b.T, w2_a.T @ through_2, None)


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
        delta = HadamardProduct.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b,
                                      self.scaling)
        return weight + cast_like(delta.view(weight.shape), weight)
