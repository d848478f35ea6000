"""``vera``: VeRA, vector-based random matrix adaptation (Kopiczko et al., 2024, eq. 1):

    W' = W + diag(b) B diag(d) A

A (r, in_max) and B (out_max, r) are frozen random matrices shared by every site of the declaration
and sliced per site (A[:, :in], B[:out, :]); each site trains d (r,) and b (out,). As peft's VeRA:
A and B are kaiming-uniform (gain sqrt 2, fan-in) drawn in that order from a CPU generator seeded
with ``projection_prng_key`` (``VeraModel._init_vera_A_vera_B``); d starts at ``d_initial`` and b
at zero (``reset_vera_parameters``), so W' == W at init. A and B are persistent buffers of the
shared :class:`VeraProjections`, so a checkpoint carries them (peft's ``save_projection=True``).
A conv weight is seen as (out, in/groups * kh * kw).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from . import register
from .base import SiteInfo, TunerArgs
from .weight_base import WeightTuner, as_matrix, attach_shared, cast_like, weight_shape

__all__ = ["VeRAArgs", "VeraProjections", "VeRA"]


class VeRAArgs(TunerArgs):
    r: int = Field(256, gt=0, le=65536, description="rank of the shared random projections")
    d_initial: float = Field(0.1, ge=-1e3, le=1e3, allow_inf_nan=False, description="initial value of d")
    projection_prng_key: int = Field(0, ge=0, lt=2**63, description="seed of the shared random A and B")


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])   # kaiming-uniform, fan-in, gain sqrt 2
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen random A (r, in_max) and B (out_max, r) of one declaration."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", _kaiming((r, in_max), generator))
        self.register_buffer("vera_B", _kaiming((out_max, r), generator))


@register
class VeRA(WeightTuner):
    name = "vera"
    Args = VeRAArgs
    shared = VeraProjections
    summary = "VeRA: shared frozen random B, A; trained scaling vectors b, d; b zero at init"
    linear_form = "additive"

    def __init__(self, shape: tuple[int, ...], projections: VeraProjections, args: VeRAArgs):
        super().__init__()
        rows, columns = as_matrix(shape)
        if rows > projections.vera_B.shape[0] or columns > projections.vera_A.shape[1]:
            raise ValueError(f"weight {shape} is larger than the shared VeRA projections")
        attach_shared(self, projections)
        self.vera_lambda_d = nn.Parameter(torch.full((args.r,), float(args.d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(rows))

    @classmethod
    def build_shared(cls, args: VeRAArgs, sites: list[SiteInfo]) -> VeraProjections:
        shapes = [as_matrix(weight_shape(site)) for site in sites]
        return VeraProjections(args.r, max(c for _, c in shapes), max(r for r, _ in shapes),
                               args.projection_prng_key)

    @classmethod
    def build(cls, args: VeRAArgs, site: SiteInfo, shared: nn.Module | None = None) -> "VeRA":
        if shared is None:
            shared = cls.build_shared(args, [site])
        return cls(weight_shape(site), shared, args)

    def forward(self, weight: Tensor) -> Tensor:
        rows, columns = weight.shape[0], weight[0].numel()
        a = self._shared.vera_A[:, :columns] * self.vera_lambda_d.unsqueeze(-1)
        b = self._shared.vera_B[:rows] * self.vera_lambda_b.unsqueeze(-1)
        return weight + cast_like((b @ a).view(weight.shape), weight)

    def output_delta(self, x: Tensor) -> Tensor:
        """b ⊙ ((d ⊙ x Aᵀ) Bᵀ), as peft's ``vera.layer.Linear.forward``."""
        rows, columns = self.vera_lambda_b.shape[0], x.shape[-1]
        a = self._shared.vera_A[:, :columns].to(x.dtype)
        b = self._shared.vera_B[:rows].to(x.dtype)
        return F.linear(F.linear(x, a) * self.vera_lambda_d.to(x.dtype), b) * self.vera_lambda_b.to(x.dtype)
