"""``kv``: learned attention keys and values (prefix tuning, Li & Liang, 2021), for the ``prefix``
placement.

``U()`` returns (keys, values), each (L, C) with C = heads x head_dim laid out as the attention's
own projections (head-major); the placement (:mod:`utdsl.placements.prefix`) splits them into
heads and joins them to K and V. With ``reparam=true`` they come from a small MLP, as in prefix tuning:
(keys | values) = W2 tanh(W1 E + b1) + b2 with E (L, C), W1 (hidden, C), W2 (2C, hidden); the MLP
trains and counts as tuner parameters.

A prefix is never the identity at init: even zero keys and values enter the softmax normaliser,
so attention becomes (1 - l) Attn(Q, K, V) + l Attn(Q, Pk, Pv) with l > 0.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from . import register
from .base import SiteInfo, Tuner, TunerArgs


class KVArgs(TunerArgs):
    length: int = Field(10, gt=0, description="number of prefix keys/values per attention")
    reparam: bool = Field(False, description="produce keys/values with an MLP (prefix tuning's reparameterisation)")
    hidden: int = Field(512, gt=0, description="hidden width of the reparameterisation MLP")
    std: float = Field(0.02, ge=0.0, description="init: keys and values (or the MLP's input) ~ N(0, std)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the keys and values")


@register
class KV(Tuner):
    name = "kv"
    Args = KVArgs
    placements = frozenset({"prefix"})
    mergeable = frozenset()
    summary = "learned keys and values joined to an attention's K and V (prefix tuning); not identity at init"

    def __init__(self, features: int, args: KVArgs):
        super().__init__()
        self.features = features
        self.dropout = nn.Dropout(args.dropout) if args.dropout else nn.Identity()
        if args.reparam:
            self.embedding = nn.Parameter(torch.empty(args.length, features))
            self.mlp = nn.Sequential(nn.Linear(features, args.hidden), nn.Tanh(),
                                     nn.Linear(args.hidden, 2 * features))
            nn.init.normal_(self.embedding, std=args.std)
        else:
            self.keys = nn.Parameter(torch.empty(args.length, features))
            self.values = nn.Parameter(torch.empty(args.length, features))
            nn.init.normal_(self.keys, std=args.std)
            nn.init.normal_(self.values, std=args.std)

    @classmethod
    def build(cls, args: KVArgs, site: SiteInfo) -> "KV":
        return cls(site.out_features, args)

    @classmethod
    def identity_at_init(cls, args: KVArgs) -> bool:
        return False

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (L, C)."""
        if hasattr(self, "mlp"):
            keys, values = self.mlp(self.embedding).split(self.features, dim=-1)
        else:
            keys, values = self.keys, self.values
        return self.dropout(keys), self.dropout(values)
