"""Backbones by name: timm names and utdsl's short aliases, built without downloading anything
unless pretrained weights are asked for."""

from __future__ import annotations

import timm
import torch
from torch import nn

from utdsl.errors import ModelError, did_you_mean

__all__ = ["ALIASES", "resolve_name", "create_model", "default_input_size"]

#: short names; vit_b16 is the ImageNet-21k checkpoint that PETL papers start from
ALIASES: dict[str, str] = {
    "vit_b16": "vit_base_patch16_224.augreg_in21k",
    "vit_s16": "vit_small_patch16_224.augreg_in21k",
    "vit_t16": "vit_tiny_patch16_224.augreg_in21k",
}


def resolve_name(name: str) -> str:
    """The timm model name for an alias or timm name; a clear error for unknown names."""
    name = ALIASES.get(name, name)
    architecture = name.split(".", 1)[0]
    if not timm.is_model(architecture):
        hint = did_you_mean(architecture, list(ALIASES) + timm.list_models())
        raise ModelError(f"unknown model '{name}'", hint=hint or "see `timm.list_models()` for names")
    return name


def create_model(name: str, *, num_classes: int | None = None, device: str | torch.device | None = None,
                 pretrained: bool = False) -> nn.Module:
    """Build ``name`` (alias or timm name). ``device="meta"`` builds the structure only (instant)."""
    timm_name = resolve_name(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with torch.device(device or "cpu"):
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs)


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) the model was configured for (timm's pretrained_cfg), or (3, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))
