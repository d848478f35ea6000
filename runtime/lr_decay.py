"""Layer-wise learning-rate decay (recipe field ``layer_decay``), as BEiT and MAE fine-tune.

Each trainable parameter gets a layer id, and its learning rate is
``lr * layer_decay ** (L + 1 - id)`` (L: the number of blocks), so the head keeps the scheduled
rate and every block below it a ``layer_decay`` times smaller one. Layer ids, first rule that
applies, on the parameter's name with the tuner namespace (``tuners.``) taken off:

1. ``i + 1`` inside the i-th numbered block (counted from the lowest index found): the first ``blocks.i``, ``layers.i``, ``stages.i``,
   ``resblocks.i`` or ``layer<i>`` (ResNet's stages) in the name. A tuner bound in block i
   (``tuners.blocks.3.attn.qkv...``) thus shares block i's rate. Hierarchical models (Swin,
   ConvNeXt, ResNet) count their stages as the blocks.
2. ``0`` for what enters before the first block: the embeddings (``patch_embed``, ``cls_token``,
   ``pos_embed``, ``reg_token``, ``dist_token``, ``norm_pre``, a CNN's ``stem``/``conv1``/``bn1``)
   and tuners bound on the block stack itself (VPT-shallow's prompts, ``tuners.blocks.prompt...``),
   which join the tokens at its input.
3. ``L + 1`` for everything else: the final norm, the head, and shared tuners
   (``tuners.shared.*``, used in every block).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = ["layer_id", "layer_scales", "num_blocks", "with_layer_decay"]

_STACKS = r"(?:blocks|layers|stages|resblocks)"
_BLOCK = re.compile(rf"(?:^|\.)(?:{_STACKS}\.|layer)(\d+)(?:\.|$)")
_STACK_ITSELF = re.compile(rf"^{_STACKS}\.(?!\d)")
_EMBED = re.compile(r"(?:^|\.)(?:patch_embed|cls_token|pos_embed|reg_token|dist_token|norm_pre|stem|conv1|bn1|"
                    r"embeddings)(?:\.|$)")


def _strip(name: str, namespace: str | None) -> str:
    if namespace and name.startswith(namespace + "."):
        return name[len(namespace) + 1:]
    return name


def _block_range(model: nn.Module) -> tuple[int, int]:
    """``(first index, L)`` of the numbered blocks in ``model``'s parameter names ((0, 0) without)."""
    found = [int(m.group(1)) for m in (_BLOCK.search(n) for n, _ in model.named_parameters()) if m]
    return (min(found), max(found) - min(found) + 1) if found else (0, 0)


def num_blocks(model: nn.Module) -> int:
    """L, the number of blocks of ``model`` (ResNet's ``layer1``..``layer4``: 4)."""
    return _block_range(model)[1]


def layer_id(name: str, blocks: int, namespace: str | None = "tuners", first: int = 0) -> int:
    """The layer id of parameter ``name`` in a model of ``blocks`` blocks numbered from ``first``
    (module docstring); ``namespace`` is the compiled model's tuner namespace."""
    local = _strip(name, namespace)
    match = _BLOCK.search(local)
    if match:
        return min(max(int(match.group(1)) - first, 0) + 1, blocks + 1)
    if _EMBED.search(local) or (local != name and _STACK_ITSELF.match(local)):
        return 0
    return blocks + 1


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """``name -> lr scale`` of every trainable parameter of ``model`` (a compiled model or any)."""
    first, blocks = _block_range(model)
    info = getattr(model, "meta", {}).get("utdsl") if isinstance(getattr(model, "meta", None), dict) else None
    namespace = getattr(info, "namespace", "tuners")
    return {n: decay ** (blocks + 1 - layer_id(n, blocks, namespace, first))
            for n, p in model.named_parameters() if p.requires_grad}


def with_layer_decay(groups: list[dict[str, Any]], model: nn.Module, decay: float) -> list[dict[str, Any]]:
    """Split optimizer ``groups`` (dicts with ``params``) by layer scale, lowest scale first within
    each group; every new group has an ``lr_scale`` that the loop multiplies the scheduled rate by."""
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
