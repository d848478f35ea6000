"""What every tuner is: an ``nn.Module`` U, a pydantic model of its arguments, the placements it
accepts, and whether it can be folded into the weights of the operation it tunes.

A tuner works on the last dimension of its input; the joints of :mod:`utdsl.placements.joint`
move a channels-first tensor's channel axis there and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

__all__ = ["TunerArgs", "SiteInfo", "Tuner"]


class TunerArgs(BaseModel):
    """Base of tuner argument models: unknown arguments are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
