"""``hadamard``: a multiplicative low-rank update, W' = W ⊙ (1 + (alpha / r) B A).

The elementwise-scaling form of PACE / GLoRA-style tuners (GLoRA, Chavan et al., 2023, eq. 4 has
a W ⊙ A term); B is zero and A kaiming-uniform as in LoRA, so W' == W at init. Every entry of W is
rescaled, never created: a zero weight stays zero.
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

    def forward(self, weight: Tensor) -> Tensor:
        return weight * (1 + self.delta(weight))
