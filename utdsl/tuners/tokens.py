"""``tokens``: learned prompt tokens (VPT, Jia et al., 2022), for the ``prompt`` placement.

U holds L tokens of the site's width C; ``U(x)`` returns them expanded to ``x``'s batch,
(B, L, C), with dropout applied per sample (VPT drops prompt entries, not whole tokens). The
placement (:mod:`utdsl.placements.prompt`) joins them to the region's input and removes them at its
output.

Initialisation: ``uniform`` is VPT's xavier-uniform-like U(-a, a) with a = sqrt(6 / (fan_in + C)),
fan_in being the patch embedding's (3 x 16 x 16 = 768 on ViT-B/16; C when the model has none);
``normal`` is N(0, std); ``zeros`` starts at zero. Prompts are never the identity at init: extra
tokens take part in every attention of the region, so the output changes whatever their values.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from . import register
from .base import SiteInfo, Tuner, TunerArgs


class TokensArgs(TunerArgs):
    length: int = Field(10, gt=0, description="number of prompt tokens")
    init: Literal["uniform", "normal", "zeros"] = Field(
        "uniform", description="uniform: VPT's xavier-uniform; normal: N(0, std); zeros")
    std: float = Field(0.02, ge=0.0, description="standard deviation for init=normal")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the prompt tokens")


@register
class Tokens(Tuner):
    name = "tokens"
    Args = TokensArgs
    placements = frozenset({"prompt"})
    mergeable = frozenset()
    summary = "learned prompt tokens joined to a token sequence (VPT); not identity at init"

    def __init__(self, features: int, args: TokensArgs, fan_in: int | None = None):
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(args.length, features))
        self.dropout = nn.Dropout(args.dropout) if args.dropout else nn.Identity()
        with torch.no_grad():
            if args.init == "uniform":
                bound = math.sqrt(6.0 / float((fan_in or features) + features))
                self.tokens.uniform_(-bound, bound)
            elif args.init == "normal":
                self.tokens.normal_(0.0, args.std)

    @classmethod
    def build(cls, args: TokensArgs, site: SiteInfo) -> "Tokens":
        return cls(site.out_features, args, site.extras.get("patch_fan_in"))

    @classmethod
    def identity_at_init(cls, args: TokensArgs) -> bool:
        return False

    @property
    def length(self) -> int:
        return self.tokens.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) prompts for the batch of ``x``."""
        return self.dropout(self.tokens.expand(x.shape[0], -1, -1))
