"""``boft``: BOFT, butterfly orthogonal fine-tuning (Liu et al., 2024, "Parameter-Efficient
Orthogonal Finetuning via Butterfly Factorization"), as peft's ``boft``:

    W' = diag(s) W M^T,    M = B_m ··· B_2 B_1,    B_i = P_i diag(R_i1, ..., R_in) P_i^T

M rotates the input (W' x = diag(s) W (M^T x); peft: x_row @ M). Each R_ij = (I - S)(I + S)^{-1}
is the Cayley transform of S = (Z - Z^T) / 2 of a trained dense b x b matrix Z (peft's ``boft_R``
and ``cayley_batch``); P_i is peft's block-butterfly permutation (``block_butterfly_perm``, P_1 = I);
s (out,) is peft's ``boft_s``. Z is zero and s one at init, so M = I and W' == W exactly.

Arguments as peft's BOFTConfig: ``block_size`` b or ``block_num`` n (one of them), and
``n_butterfly_factor`` m; b n = the input dim. peft on a machine without its CUDA extension
silently uses m = 1; here m is what is asked. A conv weight is rotated over its flattened
(in/groups · kh · kw) columns. peft's multiplicative ``boft_dropout`` is not offered.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from . import register
from .base import SiteInfo, TunerArgs
from .weight_base import WeightTuner, as_matrix, weight_shape

__all__ = ["BOFTArgs", "BOFT", "butterfly_permutation"]


class BOFTArgs(TunerArgs):
    block_size: int | None = Field(None, ge=1, le=65536, description="size b of each block (default 4)")
    block_num: int | None = Field(None, ge=1, le=65536, description="number of blocks n (instead of block_size)")
    n_butterfly_factor: int = Field(1, ge=1, le=16, description="number m of butterfly factors")

    @model_validator(mode="after")
    def _one_of(self) -> "BOFTArgs":
        if self.block_size is not None and self.block_num is not None:
            raise ValueError("give block_size or block_num, not both (their product is the input dim)")
        return self


def butterfly_permutation(n: int, blocks: int, half: int) -> Tensor:
    """peft's ``block_butterfly_perm(n, blocks, half)`` for a butterfly factor > 1: within each
    run of n / blocks indices, the chunks of ``half`` indices in even places, then the odd ones."""
    run = n // blocks
    step = run // half
    chunks = list(range(0, step, 2)) + list(range(1, step, 2))
    order = torch.cat([torch.arange(c * half, c * half + half) for c in chunks])
    return torch.cat([start + order for start in range(0, n, run)])


@register
class BOFT(WeightTuner):
    name = "boft"
    Args = BOFTArgs
    summary = "BOFT: diag(s) W M^T, M a butterfly product of block-diagonal orthogonal matrices"

    def __init__(self, shape: tuple[int, ...], args: BOFTArgs):
        super().__init__()
        columns = as_matrix(shape)[1]
        factors = args.n_butterfly_factor - 1
        if args.block_num is not None:
            num, size = args.block_num, columns // args.block_num
        else:
            size = args.block_size or 4
            num = columns // size
        problem = None
        if num * size != columns:
            problem = f"{num} blocks of size {size} do not tile the input dim {columns}"
        elif factors and (num % (2 ** factors) or size % 2 or num % 2):
            problem = (f"{args.n_butterfly_factor} butterfly factors need an even block size and a "
                       f"block count divisible by {2 ** factors} (got {num} blocks of {size})")
        if problem:
            raise ValueError(f"boft: {problem}")
        self.block_size, self.block_num = size, num
        permutations = [torch.arange(columns)] + [
            butterfly_permutation(columns, num // 2 ** i, size // 2) for i in range(1, factors + 1)]
        self.register_buffer("boft_P", torch.stack(permutations), persistent=False)
        self.boft_R = nn.Parameter(torch.zeros(factors + 1, num, size, size))
        self.boft_s = nn.Parameter(torch.ones(shape[0]))

    @classmethod
    def build(cls, args: BOFTArgs, site: SiteInfo, shared: nn.Module | None = None) -> "BOFT":
        return cls(weight_shape(site), args)

    def rotation(self) -> Tensor:
        """M (in, in): B_m ··· B_1, with B_i = P_i blockdiag(R_i) P_i^T."""
        z = self.boft_R
        skew = (z - z.transpose(-2, -1)) * 0.5
        eye = torch.eye(self.block_size, dtype=z.dtype, device=z.device).expand_as(skew)
        blocks = torch.linalg.solve(eye + skew, eye - skew, left=False)
        result = None
        for perm, factor in zip(self.boft_P, blocks):
            diagonal = torch.block_diag(*factor)
            # P D P^T with P[i, perm[i]] = 1: (P D P^T)[i, j] = D[perm[i], perm[j]]
            b = diagonal[perm][:, perm]
            result = b if result is None else b @ result
        return result

    def forward(self, weight: Tensor) -> Tensor:
        rotation = self.rotation().to(weight.dtype)
        rotated = weight.reshape(weight.shape[0], -1) @ rotation.T
        return (rotated * self.boft_s.to(weight.dtype).unsqueeze(-1)).reshape(weight.shape)
