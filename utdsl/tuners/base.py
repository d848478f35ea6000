"""What every tuner is: an ``nn.Module`` U, a pydantic model of its arguments, the placements it
accepts, and whether it can be folded into the weights of the operation it tunes.

A tuner works on the last dimension of its input; the joints of :mod:`utdsl.placements.joint`
move a channels-first tensor's channel axis there and back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from torch import nn

__all__ = ["TunerArgs", "SiteInfo", "Tuner", "INT_BOUND", "FLOAT_BOUND", "RANKED"]

#: magnitude bounds of an argument whose field declares no upper bound of its own
INT_BOUND = 2**31 - 1
FLOAT_BOUND = 1e9
#: tuner -> its rank argument, which cannot exceed the narrower side of the site it tunes
RANKED = {"lowrank": "r", "lora": "r", "dora": "r", "loha": "r", "hadamard": "r"}


class TunerArgs(BaseModel):
    """Base of tuner argument models: unknown arguments are errors, values are immutable, types
    are strict (``r=true`` and ``r="8"`` are not integers; an int is a float), floats are finite,
    and a number whose field sets no upper bound is bounded by :data:`INT_BOUND`/:data:`FLOAT_BOUND`
    (a size of 10**30 is a spec error, not an allocator crash)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        own = _own_upper_bound(cls, info.field_name or "")
        bound = INT_BOUND if isinstance(value, int) else FLOAT_BOUND
        if not own and value > bound:
            raise ValueError(f"{value:g} is too large (at most {bound:g})" if isinstance(value, float)
                             else f"{value} is too large (at most {bound})")
        if value < -bound:
            raise ValueError(f"{value} is too small (at least {-bound:g})")
        return value


@functools.cache
def _own_upper_bound(model: type[BaseModel], name: str) -> bool:
    """Whether the field ``name`` of ``model`` declares an upper bound (``le``/``lt``) itself."""
    field = model.__pydantic_fields__.get(name)  # not ``model_fields``: that builds a new dict per call
    return field is not None and any(isinstance(m, (annotated_types.Le, annotated_types.Lt)) for m in field.metadata)


@dataclass(frozen=True)
class SiteInfo:
    """What a tuner needs to know about the operation it is attached to.

    ``in_features``/``out_features`` are the channel sizes of the site's input and output (for a
    chunked site, of one chunk of the output); ``extras`` carries what a placement adds (for
    attention-level tuners: ``num_heads``, ``head_dim``, ``tokens``).
    """

    path: str
    in_features: int
    out_features: int
    extras: dict[str, Any] = field(default_factory=dict)


class Tuner(nn.Module):
    """Base of every tuner. Subclasses set the class attributes and implement ``build``."""

    name: ClassVar[str]
    Args: ClassVar[type[TunerArgs]]
    placements: ClassVar[frozenset[str]]
    summary: ClassVar[str] = ""
    #: for ``sequential``: y = h + U(h) when True, y = U(h) when False
    residual: ClassVar[bool] = True
    #: placements in which ``utdsl.merge`` can fold this tuner into the tuned op's weights
    mergeable: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def build(cls, args: TunerArgs, site: SiteInfo) -> "Tuner":
        raise NotImplementedError

    @classmethod
    def check_site(cls, args: TunerArgs, site: SiteInfo) -> None:
        """Raise ValueError when ``args`` cannot sensibly tune ``site``: a rank (:data:`RANKED`)
        above the narrower side of a linear site, where it only adds parameters."""
        field = RANKED.get(cls.name)
        rank = getattr(args, field, None) if field else None
        if rank is None or site.extras.get("conv") is not None:
            return
        width = min(site.in_features, site.out_features)
        if rank > width:
            raise ValueError(f"{field}={rank} is larger than the site's width ({site.in_features} -> "
                             f"{site.out_features}); a rank of at most {width} spans every update here")

    @classmethod
    def mergeable_with(cls, args: TunerArgs, placement: str) -> bool:
        """Whether, built with ``args``, ``utdsl.merge`` may fold this tuner in ``placement``."""
        return placement in cls.mergeable

    @classmethod
    def identity_at_init(cls, args: TunerArgs) -> bool:
        """Whether, built with ``args``, this tuner leaves its site's output unchanged at step 0."""
        return True

    def merge_delta(self):
        """For mergeable tuners: what to fold into the tuned op's weights (see utdsl.merge)."""
        raise NotImplementedError(f"{self.name} cannot be merged")
