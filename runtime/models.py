"""Backbones by name: timm names and utdsl's short aliases, built without downloading anything
unless pretrained weights are asked for.

Weights come from one of three places, recorded on the model as a
:class:`~utdsl.runtime.weights.WeightsSource` (see ``warn_if_random``): random initialization
(the default), timm's hub (``pretrained=True``: needs the network or timm's cache), or a local
file (``weights=PATH``, see :func:`~utdsl.runtime.weights.load_weights`).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from utdsl.errors import ModelError, did_you_mean

from .weights import WeightsSource, load_weights

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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def create_model(name: str, *, num_classes: int | None = None, device: str | torch.device | None = None,
                 pretrained: bool = False, weights: str | Path | None = None, **timm_kwargs) -> nn.Module:
    """Build ``name`` (alias or timm name). ``device="meta"`` builds the structure only (instant).

    ``pretrained=True`` fetches timm's pretrained weights (network or timm's cache; offline it is
    a :class:`ModelError` suggesting ``--weights``); ``weights`` loads a local file, dropping a
    head of another size. ``timm_kwargs`` go to ``timm.create_model`` (e.g. ``img_size=32``).
    The model's ``utdsl_weights`` attribute records where its weights came from.
    """
    timm_name = resolve_name(name)
    if pretrained and weights is not None:
        raise ModelError("pass either pretrained weights or a weights file, not both",
                         hint="--weights FILE loads a local file; --pretrained fetches timm's")
    if (pretrained or weights is not None) and str(device) == "meta":
        raise ModelError("a model built on the meta device holds no weights to load",
                         hint="build it on 'cpu' or a GPU")
    kwargs = dict(timm_kwargs) if num_classes is None else {**timm_kwargs, "num_classes": num_classes}
    try:
        with torch.device(device or "cpu"):
            model = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as error:
        if not pretrained:
            raise
        # offline, huggingface_hub and urllib raise OSError subclasses; timm a RuntimeError
        raise ModelError(f"cannot fetch pretrained weights for '{timm_name}': {_first_line(error)}",
                         hint="offline? pass --weights FILE (.safetensors, .pth, .npz) with the "
                              "weights saved locally") from None
    if pretrained:
        source = WeightsSource("hub", timm_name)
    elif weights is not None:
        report = load_weights(model, weights)
        source = WeightsSource("file", str(weights), report)
    else:
        source = WeightsSource("random")
    model.utdsl_weights = source
    return model


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) the model was configured for, or (3, 224, 224).

    timm's pretrained_cfg keeps the pretrained size; a ViT built with another ``img_size`` has
    the size it was built for on ``patch_embed.img_size``, which wins.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(built, (tuple, list)) and len(built) == 2 and all(isinstance(s, int) for s in built):
        size = (size[0], *built)
    return size
