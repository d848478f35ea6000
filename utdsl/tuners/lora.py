"""``lora``: LoRA as a weight update (Hu et al., 2021, eq. 3): W' = W + (alpha / r) B A.

A (r, in) is kaiming-uniform (a = sqrt 5), B (out, r) is zero, so W' == W at init; both as peft's
``LoraLayer.reset_lora_parameters`` (``init_lora_weights=True``). On a conv weight
(out, in/groups, kh, kw) A is (r, in/groups * kh * kw) and ΔW = (B A).view(W.shape), which is
peft's conv LoRA (its ``lora_A`` conv weight flattened). Input dropout has no weight-space form and
is not offered; the activation-space ``lowrank`` keeps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from . import register
from .base import SiteInfo, TunerArgs
from .weight_base import WeightTuner, as_matrix, cast_like, kaiming_, weight_shape

__all__ = ["LoRAArgs", "LoRA"]


class LoRAArgs(TunerArgs):
    r: int = Field(8, gt=0, le=65536, description="rank of ΔW")
    alpha: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False,
                                description="scaling numerator; ΔW is scaled by alpha / r (default: r)")


@register
class LoRA(WeightTuner):
    name = "lora"
    Args = LoRAArgs
    summary = "LoRA on the weight: W + (alpha/r) B A, B zero at init; merges exactly"
    linear_form = "additive"

    def __init__(self, shape: tuple[int, ...], args: LoRAArgs):
        super().__init__()
        rows, columns = as_matrix(shape)
        self.shape = shape
        self.lora_A = nn.Parameter(kaiming_(torch.empty(args.r, columns)))
        self.lora_B = nn.Parameter(torch.zeros(rows, args.r))
        self.scaling = (args.alpha if args.alpha is not None else args.r) / args.r

    @classmethod
    def build(cls, args: LoRAArgs, site: SiteInfo, shared: nn.Module | None = None) -> "LoRA":
        return cls(weight_shape(site), args)

    def delta(self, weight: Tensor) -> Tensor:
        """(alpha / r) B A in W's shape, dtype and device."""
        return cast_like((self.lora_B @ self.lora_A).view(weight.shape) * self.scaling, weight)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta(weight)

    def output_delta(self, x: Tensor) -> Tensor:
        """(alpha / r) x Aᵀ Bᵀ: peft's ``lora_B(lora_A(x)) * scaling``."""
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling
