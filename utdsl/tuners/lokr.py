"""``lokr``: LoKr, low-rank Kronecker product (Edalati et al., 2022, KronA; LyCORIS):

    W' = W + (alpha / r) kron(W1, W2)

out = a·b and in = c·d are split by peft's ``factorization`` (the divisor pair nearest the square
root, or ``decompose_factor``); W1 is (a, c), W2 is (b, d). As peft's ``LoKrLayer.update_layer``:
W2 = w2_a (b, r) w2_b (r, d) when r < max(b, d) / 2, else a full (b, d) matrix; W1 = w1_a (a, r)
w1_b (r, c) only with ``decompose_both`` and r < max(a, c) / 2. Init as peft's
``reset_adapter_parameters``: W1 (or w1_a) zero, the rest kaiming-uniform (a = sqrt 5), so W' == W
at init. On a conv weight (out, in/groups, kh, kw) in/groups is split and the kernel joins W2's
columns (W2 is (b, d·kh·kw)), which is peft's conv LoKr flattened; ``use_effective_conv2d`` and
rank/module dropout are not offered.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from . import register
from .base import SiteInfo, TunerArgs
from .weight_base import WeightTuner, cast_like, kaiming_, weight_shape

__all__ = ["LoKrArgs", "LoKr", "factorization"]


class LoKrArgs(TunerArgs):
    r: int = Field(8, gt=0, le=65536, description="rank of the decomposed Kronecker factors")
    alpha: float = Field(8.0, gt=0, le=1e6, allow_inf_nan=False, description="ΔW is scaled by alpha / r")
    decompose_both: bool = Field(False, description="also decompose the left factor W1")
    decompose_factor: int = Field(-1, ge=-1, le=65536, description="split dims near this factor (-1: sqrt)")

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, value: int) -> int:
        if value == 0:
            raise ValueError("decompose_factor is -1 (near the square root) or a positive factor")
        return value


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m * n = dimension: (factor, dimension / factor) when factor divides, else the divisor
    pair nearest the square root with m <= factor, ordered m <= n (peft's
    ``lokr.layer.factorization``, step for step)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _pair(rows: int, columns: int, r: int, decompose: bool, zero_left: bool, prefix: str,
          module: nn.Module) -> None:
    if decompose:
        a, b = torch.empty(rows, r), kaiming_(torch.empty(r, columns))
        nn.init.zeros_(a) if zero_left else kaiming_(a)
        module.register_parameter(prefix + "_a", nn.Parameter(a))
        module.register_parameter(prefix + "_b", nn.Parameter(b))
    else:
        full = torch.zeros(rows, columns) if zero_left else kaiming_(torch.empty(rows, columns))
        module.register_parameter(prefix, nn.Parameter(full))


@register
class LoKr(WeightTuner):
    name = "lokr"
    Args = LoKrArgs
    summary = "LoKr: (alpha/r) kron(W1, W2) added to W, W1 zero at init; peft's factorization"

    def __init__(self, shape: tuple[int, ...], args: LoKrArgs):
        super().__init__()
        out_l, out_k = factorization(shape[0], args.decompose_factor)
        in_m, in_n = factorization(shape[1], args.decompose_factor)
        kernel = math.prod(shape[2:])
        self.decomposed_w1 = args.decompose_both and args.r < max(out_l, in_m) / 2
        self.decomposed_w2 = args.r < max(out_k, in_n) / 2
        _pair(out_l, in_m, args.r, self.decomposed_w1, True, "lokr_w1", self)
        _pair(out_k, in_n * kernel, args.r, self.decomposed_w2, False, "lokr_w2", self)
        self.scaling = args.alpha / args.r

    @classmethod
    def build(cls, args: LoKrArgs, site: SiteInfo, shared: nn.Module | None = None) -> "LoKr":
        return cls(weight_shape(site), args)

    def forward(self, weight: Tensor) -> Tensor:
        w1 = self.lokr_w1_a @ self.lokr_w1_b if self.decomposed_w1 else self.lokr_w1
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.decomposed_w2 else self.lokr_w2
        delta = torch.kron(w1, w2) * self.scaling
        return weight + cast_like(delta.view(weight.shape), weight)
