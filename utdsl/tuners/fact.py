"""``fact_tt`` and ``fact_tk``: FacT, factor-tuning (Jie & Deng, 2023, "FacT: Factor-Tuning for
Lightweight Adaptation on Vision Transformer"), as the official ``FacT/fact_tt.py`` and
``FacT/fact_tk.py`` (JieShibo/PETL-ViT).

Every tuned weight of one declaration shares U (r, d) and V (d, r), d the model width. A site whose
weight is (a·d, b·d) (q, k, v, proj: a = b = 1; fc1: a = 4; fc2: b = 4 with a 4x MLP) has a core
Σ (a·r, b·r) and

    ΔW = s (I_a ⊗ V) Σ (I_b ⊗ U),    W' = W + ΔW

i.e. block (i, j) of ΔW is V Σ_ij U: the official MLP code applies V to each d-wide chunk of fc1's
output and U to each d-wide chunk of fc2's input.

- FacT-TT: Σ is the site's own trained matrix (the official ``*_FacTs`` linears, kaiming-uniform
  a = sqrt 5 as ``nn.Linear``).
- FacT-TK: a shared core C (r, r, r) and the site's own columns P (r, a·b) of the official ``FacTp``
  give C_site = C ×₃ P^T (r, r, a·b); Σ = C_site.reshape(r, a·r)^T for b = 1 and
  C_site.reshape(r, b·r) for a = 1, the official index layout. C and P are xavier-uniform over the
  whole (r, r, r) and (r, K) (K = Σ a·b over the declaration's sites; 144 for ViT-B).

U is kaiming-uniform (a = sqrt 5), V zero, so W' == W at init; s is ``scale``. The official
dropout (p = 0.1) on the core's output has no weight-space form and is not offered. d defaults to
the gcd of the sites' in and out features (the width for a ViT's q/k/v/proj/fc1/fc2); linear
weights only.
"""

from __future__ import annotations

import math
from functools import reduce

import torch
from pydantic import Field
from torch import Tensor, nn

from . import register
from .base import SiteInfo, TunerArgs
from .weight_base import WeightTuner, attach_shared, cast_like, kaiming_, weight_shape

__all__ = ["FacTArgs", "FacTFactors", "FacTTT", "FacTTK"]


class FacTArgs(TunerArgs):
    r: int = Field(8, gt=0, le=4096, description="rank of the shared factors (the paper's r)")
    scale: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False, description="the paper's s")
    width: int | None = Field(None, gt=0, le=1 << 20,
                              description="d, the width U and V act on (default: gcd of the sites' dims)")


def _blocks(site: SiteInfo, width: int) -> tuple[int, int]:
    shape = weight_shape(site)
    if len(shape) != 2:
        raise ValueError(f"{site.path}: FacT tunes linear weights, not a weight of shape {shape}")
    if shape[0] % width or shape[1] % width:
        raise ValueError(f"{site.path}: weight {shape} is not made of {width}-wide blocks")
    return shape[0] // width, shape[1] // width


class FacTFactors(nn.Module):
    """U (r, d) and V (d, r) of one declaration; for FacT-TK also the core C (r, r, r).
    ``columns`` is K, the core columns of every site together (what P's init is scaled by)."""

    def __init__(self, r: int, width: int, columns: int, core: bool):
        super().__init__()
        self.width, self.columns = width, columns
        self.FacTu = nn.Parameter(kaiming_(torch.empty(r, width)))
        self.FacTv = nn.Parameter(torch.zeros(width, r))
        self.FacTc = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, r, r))) if core else None


class FacTTT(WeightTuner):
    """FacT-TT: a per-site core Σ (a·r, b·r)."""

    name = "fact_tt"
    Args = FacTArgs
    shared = FacTFactors
    summary = "FacT-TT: shared U, V across all weights; per-weight core; V zero at init"
    core = False
    linear_form = "additive"

    def __init__(self, site: SiteInfo, factors: FacTFactors, args: FacTArgs):
        super().__init__()
        attach_shared(self, factors)
        self.a, self.b = _blocks(site, factors.width)
        self.r, self.scale = args.r, args.scale
        self.init_core(args)

    def init_core(self, args: FacTArgs) -> None:
        self.FacTs = nn.Parameter(kaiming_(torch.empty(self.a * args.r, self.b * args.r)))

    @classmethod
    def build_shared(cls, args: FacTArgs, sites: list[SiteInfo]) -> FacTFactors:
        width = args.width or reduce(math.gcd, [n for s in sites for n in weight_shape(s)[:2]])
        columns = sum(a * b for a, b in (_blocks(s, width) for s in sites))
        return FacTFactors(args.r, width, columns, cls.core)

    @classmethod
    def build(cls, args: FacTArgs, site: SiteInfo, shared: nn.Module | None = None) -> "FacTTT":
        return cls(site, shared if shared is not None else cls.build_shared(args, [site]), args)

    def sigma(self) -> Tensor:
        return self.FacTs

    def forward(self, weight: Tensor) -> Tensor:
        f, r = self._shared, self.r
        sigma = self.sigma().reshape(self.a, r, self.b, r)
        delta = torch.einsum("pr,arbs,sq->apbq", f.FacTv, sigma, f.FacTu).reshape(weight.shape)
        return weight + cast_like(delta * self.scale, weight)

    def output_delta(self, x: Tensor) -> Tensor:
        """s x ΔWᵀ as the official code computes it: U on each d-wide chunk of x, the core, V on
        each d-wide chunk of the result."""
        f, r = self._shared, self.r
        h = (x.unflatten(-1, (self.b, f.width)) @ f.FacTu.T.to(x.dtype)).flatten(-2)   # (..., b·r)
        h = h @ self.sigma().T.to(x.dtype)                                              # (..., a·r)
        return (h.unflatten(-1, (self.a, r)) @ f.FacTv.T.to(x.dtype)).flatten(-2) * self.scale


class FacTTK(FacTTT):
    """FacT-TK: the shared core C and per-site columns P (r, a·b)."""

    name = "fact_tk"
    summary = "FacT-TK: shared U, V and 3-way core across all weights; per-weight columns; V zero at init"
    core = True

    def __init__(self, site: SiteInfo, factors: FacTFactors, args: FacTArgs):
        super().__init__(site, factors, args)
        if self.a != 1 and self.b != 1:
            raise ValueError(f"{site.path}: FacT-TK needs the in or the out dim to be d={factors.width}")
        bound = math.sqrt(6.0 / (args.r + factors.columns))      # xavier over the whole (r, K)
        nn.init.uniform_(self.FacTp, -bound, bound)

    def init_core(self, args: FacTArgs) -> None:
        self.FacTp = nn.Parameter(torch.empty(args.r, self.a * self.b))

    def sigma(self) -> Tensor:
        core = self._shared.FacTc @ self.FacTp                   # (r, r, a·b)
        flat = core.reshape(self.r, -1)
        return flat.T if self.b == 1 else flat


register(FacTTT)
register(FacTTK)
