"""Reshaping a token-grid tuner's input to NCHW maps and back (see :mod:`utdsl.placements.grid`).

A token-grid tuner reads channels-last values: tokens (B, N, C) whose last N - P lie on the (H, W)
patch grid after P prefix tokens, or maps (B, H, W, C). :func:`to_maps` gives the prefix tokens
(or None) and the NCHW map; :func:`from_maps` undoes it.
"""

from __future__ import annotations

import math

import torch

from .base import SiteInfo, Tuner

__all__ = ["GridTuner", "to_maps", "from_maps", "conv_prefix"]


class GridTuner(Tuner):
    """Base of the token-grid tuners: the site's patch grid and prefix-token count (from the
    plan's site info), and :meth:`on_grid` to run a convolution over the grid."""

    token_grid = True

    def __init__(self, grid: tuple[int, int] | None, prefix_tokens: int, prefix: str):
        super().__init__()
        self.grid, self.prefix_tokens, self.conv_prefix = grid, prefix_tokens, prefix == "conv1x1"

    @classmethod
    def build(cls, args, site: SiteInfo) -> "GridTuner":
        return cls(site.in_features, site.out_features, args, site.extras.get("grid"),
                   site.extras.get("prefix_tokens", 0))

    def extra_repr(self) -> str:
        return f"grid={self.grid}, prefix_tokens={self.prefix_tokens}"

    def on_grid(self, z: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
        """``conv`` over the grid of z's patch tokens (prefix tokens as 1x1 maps with
        ``prefix=conv1x1``, else unchanged), z's layout kept."""
        head, maps = to_maps(z, self.grid, self.prefix_tokens)
        if head is not None and self.conv_prefix:
            head = conv_prefix(conv, head)
        return from_maps(head, conv(maps), z)


def to_maps(x: torch.Tensor, grid: tuple[int, int] | None, prefix: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    if x.dim() == 4:
        return None, x.permute(0, 3, 1, 2)
    b, n, c = x.shape
    h, w = grid if grid is not None and grid[0] * grid[1] == n - prefix else _square(n - prefix)
    head = x[:, :prefix] if prefix else None
    return head, x[:, prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2)


def from_maps(head: torch.Tensor | None, maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = maps.permute(0, 2, 3, 1)
    if like.dim() == 4:
        return out
    out = out.reshape(out.shape[0], -1, out.shape[-1])
    return out if head is None else torch.cat([head, out], dim=1)


def conv_prefix(conv: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Each prefix token through ``conv`` as a 1x1 map (Convpass's cls token): a 'same'-padded
    convolution of a 1x1 map applies its centre tap and bias."""
    b, p, c = tokens.shape
    return conv(tokens.reshape(b * p, c, 1, 1)).reshape(b, p, -1)


def _square(patches: int) -> tuple[int, int]:
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patch tokens do not fit the grid this tuner was built for, nor a square")
    return side, side
