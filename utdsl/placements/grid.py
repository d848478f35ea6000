"""Token grids: where the patch tokens a convolutional tuner reads lie on the image's H x W grid.

Tuners with ``token_grid = True`` (``conv_adapter``, ``mona``) reshape their site's tokens to the
patch grid, convolve, and reshape back. Stage ``plan`` calls :func:`token_grid` on their sites and
adds to the tuner's :class:`~utdsl.tuners.SiteInfo`:

- ``prefix_tokens``: how many tokens precede the patches (cls, distillation and register tokens:
  timm's ``num_prefix_tokens``; 0 for Swin's token sequences);
- ``grid``: (H, W) of the patches, read from the nearest earlier 4-d value of the graph whose
  spatial size holds the patches and whose other axis is the channel count (the patch embedding's
  output on a ViT, the block's NHWC input on Swin); a square grid when none is found; None when
  the value already is a map (Swin's NHWC blocks, ConvNeXt's NCHW or NHWC), which the joint
  hands to the tuner channels-last.
"""

from __future__ import annotations

import math

import torch.fx as fx

from ..trace import Region
from ..tuners import SiteInfo
from .base import SiteError, tensor_shape

__all__ = ["token_grid"]


def token_grid(info: SiteInfo, gm: fx.GraphModule, found: Region, placement: str) -> SiteInfo:
    """``info`` with the grid of the value the tuner reads (the site's input for ``parallel``, its
    output for ``sequential``). :class:`SiteError` when the value is not tokens or a map."""
    if "chunk_size" in info.extras:
        raise SiteError("a token-grid tuner tunes every channel; this rule names chunks")
    value = found.tensor_inputs[0] if placement == "parallel" else found.outputs[0]
    shape = tensor_shape(value)
    if len(shape) == 4:
        return SiteInfo(info.path, info.in_features, info.out_features,
                        {**info.extras, "grid": None, "prefix_tokens": 0})
    if len(shape) != 3:
        raise SiteError(f"a token-grid tuner reads tokens (batch, tokens, channels) or a map; this value is "
                        f"{'x'.join(map(str, shape))}")
    _, tokens, channels = shape
    prefix = int(getattr(gm, "num_prefix_tokens", 0) or 0)
    patches = tokens - prefix
    if patches <= 0:
        raise SiteError(f"{tokens} tokens, of which {prefix} prefix tokens: no patches to put on a grid")
    grid = _grid_upstream(value, patches, channels)
    if grid is None:
        side = math.isqrt(patches)
        if side * side != patches:
            raise SiteError(f"cannot find the grid of {patches} patch tokens: no earlier map holds them "
                            "and they are not a square")
        grid = (side, side)
    return SiteInfo(info.path, info.in_features, info.out_features,
                    {**info.extras, "grid": grid, "prefix_tokens": prefix})


def _grid_upstream(value: fx.Node, patches: int, channels: int, limit: int = 400) -> tuple[int, int] | None:
    """(H, W) of the nearest earlier 4-d value with H * W = ``patches`` and ``channels`` on its
    first or last axis (NCHW or NHWC)."""
    frontier, seen = [value], {value}
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if hasattr(meta, "shape") else ()
        if len(shape) == 4:
            _, a, b, c = shape
            if c == channels and a * b == patches:
                return a, b
            if a == channels and b * c == patches:
                return b, c
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                frontier.append(arg)
    return None
