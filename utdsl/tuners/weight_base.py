"""What every weight-space tuner is: U maps the tuned op's weight W to a new weight W' = f(W), used
wherever W is used (a module call or a functional ``F.linear``), and folds exactly (W := f(W)).

A unit sees one weight: (out, in) for a linear, (out, in/groups, kh, kw) for a conv, (out/c, in)
for one chunk of a fused weight (``site.extras["weight_shape"]``). Tuners whose math is on a
matrix view the weight as (out, prod(rest)), as peft's conv LoRA does; that view is
:func:`as_matrix`.

A tuner with state shared by every site of one declaration (VeRA's random projections, FacT's
factors) sets ``shared`` to that state's class and builds it once in :meth:`WeightTuner.build_shared`;
each unit keeps it as an *unregistered* attribute ``_shared`` so its parameters are counted, saved
and optimised once, under the module the placement registers it as.

Activation form: where a linear's weight is read by that one call alone, ``F.linear(x, f(W), b)``
would keep W' for the backward and pay the dense weight-gradient GEMM dL/dW' = dyᵀx. A tuner that
can compute the call's output without forming W' sets ``linear_form`` and the placement calls it
instead (:func:`utdsl.placements.weight.lower_linear_calls`): ``"additive"`` tuners give the
output delta ``F.linear(x, f(W)) - F.linear(x, W)`` of ``output_delta(x)`` (LoRA, VeRA, FacT, as
peft's LoRA layers), ``"linear"`` tuners give the whole call ``linear(x, W, b)`` (OFT rotates x).
Both equal ``F.linear(x, f(W), b)`` up to rounding; merge and export see the weight form again.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from .base import SiteInfo, Tuner, TunerArgs

__all__ = ["WeightTuner", "weight_shape", "as_matrix", "attach_shared", "kaiming_", "cast_like"]


def weight_shape(site: SiteInfo) -> tuple[int, ...]:
    """The shape of the weight a unit at ``site`` transforms: ``extras["weight_shape"]`` or, on a
    site that does not give one, the linear shape (out, in)."""
    shape = site.extras.get("weight_shape")
    return tuple(int(n) for n in shape) if shape is not None else (site.out_features, site.in_features)


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of the matrix view of a weight: (out, in/groups * kh * kw) for a conv."""
    return shape[0], math.prod(shape[1:])


def attach_shared(unit: nn.Module, shared: nn.Module | None) -> None:
    """Keep ``shared`` on ``unit`` without registering it, so it is counted and saved once."""
    object.__setattr__(unit, "_shared", shared)


class WeightTuner(Tuner):
    """Base of the weight-space tuners: ``forward(W) -> W'`` of W's shape, dtype and device."""

    placements = frozenset({"weight"})
    mergeable = frozenset({"weight"})
    #: the class of the state shared by every site of one declaration, or None
    shared: ClassVar[type[nn.Module] | None] = None
    #: True when the paper's init reads W (DoRA's magnitude): the placement calls
    #: :meth:`init_from_weight` once with the site's weight right after :meth:`build`
    needs_weight_init: ClassVar[bool] = False
    #: how a linear call's output is computed without W' (module docstring), or None: W' only
    linear_form: ClassVar[Literal["additive", "linear"] | None] = None

    @classmethod
    def build(cls, args: TunerArgs, site: SiteInfo, shared: nn.Module | None = None) -> "WeightTuner":
        raise NotImplementedError

    @classmethod
    def build_shared(cls, args: TunerArgs, sites: list[SiteInfo]) -> nn.Module | None:
        """The state shared by ``sites`` (every site of one declaration), built once; None when the
        tuner shares nothing."""
        return None

    def init_from_weight(self, weight: Tensor) -> None:
        """Initialise what the paper initialises from W (default: nothing)."""

    def forward(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def output_delta(self, x: Tensor) -> Tensor:
        """``F.linear(x, f(W)) - F.linear(x, W)`` for an ``"additive"`` tuner (f(W) - W independent of W)."""
        raise NotImplementedError

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear(x, f(weight), bias)``, in the tuner's activation form where it has one."""
        if self.linear_form == "additive":
            return F.linear(x, weight, bias) + self.output_delta(x).to(x.dtype)
        return F.linear(x, self(weight), bias)

    def merge_delta(self):
        raise NotImplementedError(f"{self.name} is merged as W := f(W); call the unit on the weight")


def kaiming_(tensor: Tensor) -> Tensor:
    """``nn.Linear``'s (and peft's) default init: kaiming-uniform with a = sqrt(5)."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def cast_like(delta: Tensor, weight: Tensor) -> Tensor:
    return delta.to(dtype=weight.dtype, device=weight.device)

