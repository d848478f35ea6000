"""``res_adapter``: one step of a Res-Tuning-Bypass side chain (Jiang et al., NeurIPS 2023; the
official code is modelscope/swift, ``swift/tuners/restuning.py`` and ``restuning_components.py``).

At each read site the step takes the backbone's detached value h there and the chain's state s
and returns the next state

    s' = (h + A(h)) + (s + B(s)),    A(z), B(z) = up(gelu(down(z))),

A the *lateral* Res-Adapter (reads the backbone), B the *vertical* one (carries the bypass), each
a bottleneck of ``dim`` channels (swift's ``adapter_length``, 32) with biases; down and up start
xavier-uniform with biases N(0, 1e-6), as swift's ``ResAdapter`` does (no zero init: a bypass is
not the identity at init). ``lateral=identity`` / ``vertical=identity`` drop A or B (the term
passes unchanged), ``zero`` drops the whole term (swift's ``None`` and ``'zero'`` configs).

:class:`SideArgs` are the arguments every tuner of the ``side`` placement takes (where the chain
is injected, and how); see :mod:`utdsl.placements.side`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from . import register
from .base import SiteInfo, Tuner, TunerArgs

__all__ = ["SideArgs", "ResAdapterArgs", "ResAdapter", "parse_selector"]


def parse_selector(text: str):
    """``text`` as a :class:`~utdsl.syntax.Selector` (the spec language's selector syntax);
    ValueError with the parser's message when it is not one."""
    from ..errors import SpecError
    from ..parse import parse

    if not text.strip() or "\n" in text:
        raise ValueError(f"'{text}' is not a module selector")
    try:
        spec = parse(f"train {text}")
    except SpecError as error:
        raise ValueError(f"'{text}' is not a module selector: {error.diagnostics[0].message}") from None
    return spec.param_rules[0].selector


class SideArgs(TunerArgs):
    """What every ``side`` tuner takes besides its own arguments."""

    at: str = Field(description="the module whose input receives the side chain's result (a selector "
                                "matching one module, e.g. \"^norm\"); it must run after every read site")
    join: Literal["replace", "add"] = Field(
        "replace", description="replace: that input becomes the chain's state (Res-Tuning-Bypass); "
                               "add: the state is added to it")

    @field_validator("at")
    @classmethod
    def _selector(cls, value: str) -> str:
        selector = parse_selector(value)
        if any(path.span_site is not None or path.chunks is not None for path in selector.paths):
            raise ValueError("the injection point is a module: no span or chunks")
        return value


class ResAdapterArgs(SideArgs):
    dim: int = Field(32, gt=0, description="bottleneck width of each Res-Adapter (swift's adapter_length)")
    lateral: Literal["adapter", "identity", "zero"] = Field(
        "adapter", description="the term reading the backbone: h + A(h), h, or nothing")
    vertical: Literal["adapter", "identity", "zero"] = Field(
        "adapter", description="the term carrying the bypass: s + B(s), s, or nothing")


class _Bottleneck(nn.Module):
    """up(gelu(down(z))), xavier-uniform weights, biases N(0, 1e-6)."""

    def __init__(self, features: int, dim: int):
        super().__init__()
        self.down = nn.Linear(features, dim)
        self.act = nn.GELU()
        self.up = nn.Linear(dim, features)
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(z)))


@register
class ResAdapter(Tuner):
    name = "res_adapter"
    Args = ResAdapterArgs
    placements = frozenset({"side"})
    mergeable = frozenset()
    summary = "Res-Tuning-Bypass step: s' = (h + A(h)) + (s + B(s)), lateral and vertical Res-Adapters"

    def __init__(self, features: int, args: ResAdapterArgs):
        super().__init__()
        self.lateral_mode, self.vertical_mode = args.lateral, args.vertical
        self.lateral = _Bottleneck(features, args.dim) if args.lateral == "adapter" else None
        self.vertical = _Bottleneck(features, args.dim) if args.vertical == "adapter" else None

    @classmethod
    def build(cls, args: ResAdapterArgs, site: SiteInfo) -> "ResAdapter":
        if site.in_features != site.out_features:
            raise ValueError(f"the read value has {site.in_features} channels, the chain's state "
                             f"{site.out_features}; a Res-Tuning step adds them")
        return cls(site.in_features, args)

    @classmethod
    def identity_at_init(cls, args: ResAdapterArgs) -> bool:
        return False

    @staticmethod
    def _term(mode: str, unit: nn.Module | None, z: torch.Tensor) -> torch.Tensor | None:
        if mode == "zero":
            return None
        return z if unit is None else z + unit(z)

    def forward(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        terms = [t for t in (self._term(self.lateral_mode, self.lateral, h),
                             self._term(self.vertical_mode, self.vertical, s)) if t is not None]
        if not terms:
            return torch.zeros_like(s)
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]
