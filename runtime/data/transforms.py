"""Image transforms for training and evaluation, from a model's pretrained configuration.

Training: ``RandomResizedCrop`` and a horizontal flip, each optional (a recipe turns them off for
data whose geometry carries the label, such as digits); without the crop, training images get the
evaluation geometry. Evaluation: resize to ``size / crop_pct`` and center-crop to ``size``
(``crop_pct >= 1`` resizes straight to ``size``, as VTAB protocols do). Both end with
``ToTensor`` and ``Normalize(mean, std)``. Training on image files uses the uint8 twin of this
pipeline (:mod:`.loading`).
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..models import default_input_size

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_transforms", "model_data_config", "transforms_for_model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    size = tuple(int(s) for s in input_size)
    return size[-2], size[-1]  # (C, H, W) or (H, W)


def build_transforms(input_size: int | Sequence[int], train: bool,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None, *,
                     random_crop: bool = True, hflip: bool = True, crop_pct: float = 0.875,
                     interpolation: str = "bicubic",
                     scale: tuple[float, float] = (0.08, 1.0), tensor: bool = False):
    """The PIL-image -> normalized tensor transform.

    ``input_size`` is an int, ``(H, W)`` or ``(C, H, W)``; ``mean``/``std`` default to ImageNet's.
    ``random_crop`` and ``hflip`` apply to training only. ``tensor=True`` gives its uint8 twin,
    a :class:`~.loading.TensorPipeline` (image files decoded by torchvision, normalised where the
    model runs), the same images within rounding.
    """
    height, width = _size(input_size)
    if tensor:
        from .loading import TensorPipeline

        return TensorPipeline((height, width), train, tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD),
                              random_crop=random_crop, hflip=hflip, crop_pct=crop_pct,
                              interpolation=interpolation, scale=scale)
    mode = InterpolationMode(interpolation)
    steps: list = []
    if train and random_crop:
        steps.append(T.RandomResizedCrop((height, width), scale=scale, interpolation=mode))
    elif crop_pct >= 1.0:
        steps.append(T.Resize((height, width), interpolation=mode))
    else:
        if height == width:
            steps.append(T.Resize(math.floor(height / crop_pct), interpolation=mode))
        else:
            steps.append(T.Resize((math.floor(height / crop_pct), math.floor(width / crop_pct)),
                                  interpolation=mode))
        steps.append(T.CenterCrop((height, width)))
    if train and hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD))]
    return T.Compose(steps)


def model_data_config(model: nn.Module) -> dict:
    """``input_size`` (C, H, W), ``mean``, ``std``, ``crop_pct`` and ``interpolation`` of a timm
    model's pretrained configuration, with ImageNet defaults for what it does not say."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    interpolation = cfg.get("interpolation") or "bicubic"
    return {
        "input_size": default_input_size(model),
        "mean": tuple(cfg.get("mean") or IMAGENET_MEAN),
        "std": tuple(cfg.get("std") or IMAGENET_STD),
        "crop_pct": float(cfg.get("crop_pct") or 0.875),
        "interpolation": interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic",
    }


def transforms_for_model(model: nn.Module, train: bool, *, random_crop: bool = True,
                         hflip: bool = True, crop_pct: float | None = None) -> T.Compose:
    """:func:`build_transforms` with the size, normalization and interpolation ``model`` expects."""
    cfg = model_data_config(model)
    return build_transforms(cfg["input_size"], train, cfg["mean"], cfg["std"], random_crop=random_crop,
                            hflip=hflip, crop_pct=cfg["crop_pct"] if crop_pct is None else crop_pct,
                            interpolation=cfg["interpolation"])
