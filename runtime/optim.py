"""Optimizer and learning-rate schedule of a recipe: AdamW or SGD, linear warm-up then cosine.

The learning rate is a pure function of the optimizer step (:func:`lr_at`), so resuming a run
needs only the step to continue the schedule exactly. With ``layer_decay`` the parameter groups
are split by layer (:mod:`.lr_decay`) and each group's rate is the scheduled one times its
``lr_scale`` (:func:`set_lr`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .recipes import Recipe

__all__ = ["build_optimizer", "lr_at", "set_lr", "schedule_info"]


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s trainable parameters, in ``named_parameters`` order.

    Weight decay applies to parameters of two or more dimensions, and to 1-d ones (biases, norm
    weights, scales) only with ``decay_1d``. With ``layer_decay`` each of these groups is split
    by layer-wise learning-rate scale (:func:`~.lr_decay.with_layer_decay`); every group has an
    ``lr_scale`` (1.0 without layer decay).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 or recipe.decay_1d else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if groups and recipe.layer_decay is not None:
        from .lr_decay import with_layer_decay

        groups = with_layer_decay(groups, model, recipe.layer_decay)
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    if not groups:
        from utdsl.errors import SpecError

        raise SpecError("nothing to train: the model has no parameter that requires grad",
                        hint="add a tuner rule or `train @classifier` to the spec")
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group the scheduled rate ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _warmup_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    return int(round(recipe.warmup_epochs * steps_per_epoch))


def lr_at(step: int, recipe: Recipe, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear from ``warmup_lr`` to ``lr`` over
    the warm-up steps (the last warm-up step uses ``lr``), then cosine down to ``min_lr``."""
    total = recipe.epochs * steps_per_epoch
    warmup = min(_warmup_steps(recipe, steps_per_epoch), total)
    if step < warmup:
        return recipe.warmup_lr + (recipe.lr - recipe.warmup_lr) * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_info(recipe: Recipe, steps_per_epoch: int) -> dict[str, int | str]:
    """What determines the schedule, stored with the resume state and checked on resume."""
    return {"name": "warmup_cosine", "steps_per_epoch": steps_per_epoch,
            "total_steps": recipe.epochs * steps_per_epoch,
            "warmup_steps": _warmup_steps(recipe, steps_per_epoch)}
