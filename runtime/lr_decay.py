"""Layer-wise learning-rate decay (recipe field ``layer_decay``, as BEiT/MAE fine-tuning uses).

A parameter's layer id is 0 for the embeddings (``patch_embed``, ``cls_token``, ``pos_embed``,
``reg_token``, a CNN ``stem``/``conv1``/``bn1``), ``i + 1`` inside the i-th numbered block
(the first ``blocks.i``/``layers.i``/``stages.i``/``layer<i>`` in its name, so tuners under
``tuners.blocks.i`` share their block's id), and ``L + 1`` for everything after the blocks (final
norm, head), L being the number of blocks. Its learning rate is ``lr * decay ** (L + 1 - id)``.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = ["layer_id", "layer_scales", "with_layer_decay"]

_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers|stages|resblocks|layer)\.?(\d+)(?:\.|$)")
_EMBED = re.compile(r"(?:^|\.)(?:patch_embed|cls_token|pos_embed|reg_token|dist_token|stem|conv1|bn1|embeddings)(?:\.|$)")


def layer_id(name: str, num_blocks: int) -> int:
    """The layer id of parameter ``name`` in a model of ``num_blocks`` blocks (module docstring)."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if _EMBED.search(name):
        return 0
    return num_blocks + 1


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """``name -> lr scale`` of every trainable parameter of ``model``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    every = [n for n, _ in model.named_parameters()]
    blocks = [int(m.group(1)) for m in map(_BLOCK.search, every) if m]
    num_blocks = max(blocks) + 1 if blocks else 0
    return {n: decay ** (num_blocks + 1 - layer_id(n, num_blocks)) for n in names}


def with_layer_decay(groups: list[dict[str, Any]], model: nn.Module, decay: float) -> list[dict[str, Any]]:
    """Split optimizer ``groups`` (dicts with ``params``) by layer scale; each new group has an
    ``lr_scale`` that the training loop multiplies the scheduled learning rate by."""
    scales = layer_scales(model, decay)
    scale_of = {id(p): scales[n] for n, p in model.named_parameters() if n in scales}
    split: list[dict[str, Any]] = []
    for group in groups:
        by_scale: dict[float, list] = {}
        for param in group["params"]:
            by_scale.setdefault(scale_of.get(id(param), 1.0), []).append(param)
        for scale in sorted(by_scale):
            split.append({**group, "params": by_scale[scale], "lr_scale": scale})
    return split
