"""``oft``: OFT, orthogonal fine-tuning (Qiu et al., 2023), as peft's current ``oft`` (>= 0.18):

    W' = W R^T,    R = diag(R_1, ..., R_n) block-diagonal over the input dim

so W' x = W (R^T x), the input rotated, as peft's ``OFTRotationModule.forward`` (x_row @ R) and
``Linear.merge`` (W := (R W^T)^T). Each block is a Cayley transform of a skew-symmetric Q_i built
from a trained vector of its b(b-1)/2 upper-triangle entries (peft's ``oft_R.weight``). peft's
default, and ours, is the Cayley–Neumann series of (I + Q)(I - Q)^{-1} cut at ``neumann_terms`` t,
term for term as peft's ``_cayley_batch``: R = I + 2Q for t = 2, else
R = I + 2Q + 2Q² + 2Q³ + ... + 2Q^{t-2} + Q^{max(t-1, 3)} (t = 5, the default: I + 2Q + 2Q² + 2Q³
+ Q⁴; peft gives t = 3 and t = 4 the same R), orthogonal up to the cut; ``cayley_neumann=false``
is peft's exact form R = (I - Q)(I + Q)^{-1} (a linear solve; the transpose of the series' limit).
Q is zero at init, so R = I and W' == W exactly.

The block size b (peft's ``oft_block_size``, default 32) or the block count n (peft's ``r``) is
given, not both; b must divide the input dim (peft instead moves it to a divisor with a warning).
A conv weight is rotated over its flattened (in/groups · kh · kw) columns. peft's ``coft``/``eps``
(constrained OFT), ``block_share`` and multiplicative ``module_dropout`` are not offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from . import register
from .base import SiteInfo, TunerArgs
from .weight_base import WeightTuner, as_matrix, weight_shape

__all__ = ["OFTArgs", "OFT", "skew_symmetric", "cayley_neumann"]


class OFTArgs(TunerArgs):
    block_size: int | None = Field(None, ge=2, le=65536, description="size b of each block (default 32)")
    r: int | None = Field(None, gt=0, le=65536, description="number of blocks n (instead of block_size)")
    cayley_neumann: bool = Field(True, description="Cayley–Neumann series (peft's default) or exact Cayley")
    neumann_terms: int = Field(5, ge=2, le=64, description="terms of the Cayley–Neumann series")

    @model_validator(mode="after")
    def _one_of(self) -> "OFTArgs":
        if self.block_size is not None and self.r is not None:
            raise ValueError("give block_size or r, not both (r * block_size is the input dim)")
        return self


def skew_symmetric(vector: Tensor, size: int) -> Tensor:
    """(n, b, b) skew-symmetric matrices from (n, b(b-1)/2) upper-triangle entries (row-major)."""
    rows, cols = torch.triu_indices(size, size, 1, device=vector.device)
    q = vector.new_zeros(vector.shape[0], size, size)
    q[:, rows, cols] = vector
    return q - q.transpose(-2, -1)


def cayley_neumann(q: Tensor, terms: int) -> Tensor:
    """peft's truncated series (``OFTRotationModule._cayley_batch``): I + 2Q for 2 terms, else
    I + 2Q + 2Q² + 2Q³ ... + 2Q^{terms-2} + Q^{max(terms-1, 3)}."""
    r = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q) + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


@register
class OFT(WeightTuner):
    name = "oft"
    Args = OFTArgs
    summary = "OFT: W R^T, R block-diagonal orthogonal (Cayley of a skew Q), Q zero at init"
    linear_form = "linear"

    def __init__(self, shape: tuple[int, ...], args: OFTArgs):
        super().__init__()
        columns = as_matrix(shape)[1]
        if args.r is not None:
            count, size = args.r, columns // args.r
        else:
            size = args.block_size or 32
            count = columns // size
        if count * size != columns or size < 2:
            raise ValueError(f"oft: {count} blocks of size {size} do not tile the input dim {columns}")
        self.block_size, self.blocks = size, count
        self.cayley_neumann, self.neumann_terms = args.cayley_neumann, args.neumann_terms
        self.oft_R = nn.Parameter(torch.zeros(count, size * (size - 1) // 2))

    @classmethod
    def build(cls, args: OFTArgs, site: SiteInfo, shared: nn.Module | None = None) -> "OFT":
        return cls(weight_shape(site), args)

    def rotation(self) -> Tensor:
        """The blocks R_i, (n, b, b)."""
        q = skew_symmetric(self.oft_R, self.block_size)
        if self.cayley_neumann:
            return cayley_neumann(q, self.neumann_terms)
        eye = torch.eye(self.block_size, dtype=q.dtype, device=q.device).expand_as(q)
        return torch.linalg.solve(eye + q, eye - q, left=False)

    def forward(self, weight: Tensor) -> Tensor:
        rotation = self.rotation().to(weight.dtype)
        blocks = weight.reshape(weight.shape[0], self.blocks, self.block_size)
        return torch.einsum("orc,rkc->ork", blocks, rotation).reshape(weight.shape)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """F.linear(x R, W, b): each b-wide block of x times its R_i, as peft's
        ``OFTRotationModule.forward``; W' is never formed."""
        if weight.dim() != 2:
            return F.linear(x, self(weight), bias)
        rotation = self.rotation().to(x.dtype)
        blocks = x.unflatten(-1, (self.blocks, self.block_size))               # (..., n, b)
        rotated = torch.einsum("...rk,rkc->...rc", blocks, rotation).flatten(-2)
        return F.linear(rotated, weight, bias)
