"""``dora``: DoRA, weight-decomposed low-rank adaptation (Liu et al., 2024, eq. 5):

    W' = m ⊙ (W + s B A) / ||W + s B A||_c,    s = alpha / r

with ||·||_c the L2 norm of each output row over the input dim (over in/groups, kh, kw for a conv),
as peft's ``DoraLinearLayer.get_weight_norm`` (``torch.linalg.norm(weight, dim=1)``) and
``_DoraConvNdLayer``. The norm is detached from the graph, as peft does by default and the paper
advises (section 4.3): it tracks ΔW but passes no gradient. m is set to ||W||_c by
:meth:`DoRA.init_from_weight`, which the placement calls once with the site's weight; with B zero
that makes W' == W exactly at init. Until then m is NaN, so a missed call cannot pass unseen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import register
from .base import SiteInfo
from .lora import LoRA, LoRAArgs
from .weight_base import weight_shape

__all__ = ["DoRAArgs", "DoRA"]


class DoRAArgs(LoRAArgs):
    pass


@register
class DoRA(LoRA):
    name = "dora"
    Args = DoRAArgs
    summary = "DoRA: magnitude m times the direction of W + (alpha/r) B A; identity at init"
    needs_weight_init = True
    linear_form = None     # the row norms of W + s B A need W' itself

    def __init__(self, shape: tuple[int, ...], args: DoRAArgs):
        super().__init__(shape, args)
        self.magnitude = nn.Parameter(torch.full((shape[0],), float("nan")))

    @classmethod
    def build(cls, args: DoRAArgs, site: SiteInfo, shared: nn.Module | None = None) -> "DoRA":
        return cls(weight_shape(site), args)

    def direction(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """V = W + s B A and its detached row norms ||V||_c (shape (out,))."""
        v = weight + self.delta(weight)
        return v, v.detach().flatten(1).norm(p=2, dim=1)

    @torch.no_grad()
    def init_from_weight(self, weight: Tensor) -> None:
        self.magnitude.copy_(self.direction(weight)[1])

    def forward(self, weight: Tensor) -> Tensor:
        v, norm = self.direction(weight)
        scale = (self.magnitude.to(weight.dtype) / norm).view(-1, *(1,) * (weight.dim() - 1))
        return v * scale
