"""Reshaping a token-grid tuner's input to NCHW maps and back (see :mod:`utdsl.placements.grid`).

A token-grid tuner reads channels-last values: tokens (B, N, C) whose last N - P lie on the (H, W)
patch grid after P prefix tokens, or maps (B, H, W, C). :func:`to_maps` gives the prefix tokens
(or None) and the NCHW map; :func:`from_maps` undoes it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["to_maps", "from_maps", "conv_prefix"]


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
