"""``hadamard``: a multiplicative low-rank update, W' = W ⊙ (1 + (alpha / r) B A).

Each entry of W is rescaled by a low-rank scale map, the elementwise form of the weight-scaling
terms of GLoRA (Chavan et al., 2023) and PACE-style multiplicative tuners; no one paper's
parameterisation is claimed. B is zero and A kaiming-uniform (a = sqrt 5) as in LoRA, so
W' == W exactly at init. A zero weight stays zero.
"""

from __future__ import annotations

from torch import Tensor

from . import register
from .lora import LoRA, LoRAArgs

__all__ = ["HadamardArgs", "Hadamard"]


class HadamardArgs(LoRAArgs):
    pass


@register
class Hadamard(LoRA):
    name = "hadamard"
    Args = HadamardArgs
    summary = "multiplicative update W ⊙ (1 + (alpha/r) B A), B zero at init; merges exactly"
    linear_form = None     # multiplicative: W' - W depends on W

    def forward(self, weight: Tensor) -> Tensor:
        return weight * (1 + self.delta(weight))
