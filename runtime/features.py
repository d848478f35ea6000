"""The recipe's training features as the loop in :mod:`.train` uses them, in one place.

- ``channels_last``: the model's 4-d weights and every 4-d batch in channels-last memory format
  (what convolutions on GPUs want; a ViT's patch embedding is its only 4-d weight).
- ``mixup_alpha``/``cutmix_alpha``: :class:`~.mixup.Mixer`, seeded per batch from
  (seed, rank, epoch, batch) apart from the forward pass's own seed.
- ``ema_decay``: :class:`~.ema.ParameterEMA`, updated after each optimizer step; evaluation and
  the tuner checkpoints use it (:meth:`RunFeatures.evaluated`), the resume state keeps it.
- ``drop_path_rate`` and ``layer_decay`` act elsewhere (model creation, optimizer groups).

:func:`profile` and :func:`summary_row` make the ``summary`` row of ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from .distributed import SeededDataset, mix_seed
from .ema import ParameterEMA
from .mixup import Mixed, Mixer
from .profiling import forward_flops, parameter_counts, peak_memory_mb, peak_memory_source
from .recipes import Recipe

__all__ = ["RunFeatures", "to_memory_format", "profile", "summary_row"]

_MIX_STREAM = 0x6D6978  # keeps the mixer's seeds apart from the forward pass's


def to_memory_format(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``images`` in channels-last format when asked and 4-d; otherwise unchanged."""
    if channels_last and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


class RunFeatures:
    """What the recipe adds to a training loop over ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, recipe: Recipe):
        self.recipe = recipe
        self.channels_last = recipe.channels_last
        self.mixer = Mixer.from_recipe(recipe)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        # after the format change: the shadow copies take the parameters' layout
        self.ema = ParameterEMA(model, recipe.ema_decay) if recipe.ema_decay else None

    @property
    def evaluated_params(self) -> str:
        """Which parameters evaluation and checkpoints use: ``"ema"`` or ``"raw"``."""
        return "ema" if self.ema is not None else "raw"

    def batch(self, images: torch.Tensor, targets: torch.Tensor, rank: int, epoch: int, index: int) -> Mixed:
        """The batch the forward pass takes: in the model's memory format, mixed when asked."""
        images = to_memory_format(images, self.channels_last)
        if self.mixer is None:
            return Mixed(images, targets, 1.0, "none")
        return self.mixer(images, targets, mix_seed(self.recipe.seed, rank, epoch, index, _MIX_STREAM))

    def stepped(self) -> None:
        """After an optimizer step that updated the parameters."""
        if self.ema is not None:
            self.ema.update()

    @contextlib.contextmanager
    def evaluated(self) -> Iterator[None]:
        """The parameters to evaluate and save: the EMA inside the block when the recipe keeps one."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            yield


def profile(model: nn.Module, train_set: Dataset, seed: int) -> dict[str, Any]:
    """Trainable and total parameters of ``model`` and the FLOPs of one forward on the first
    training sample (batch 1, the run's input size; read as the loop reads it, random state kept)."""
    example = SeededDataset(train_set, seed)[(0, 0)][0]
    trainable, total = parameter_counts(model)
    return {"trainable_params": trainable, "total_params": total,
            "forward_flops": forward_flops(model, torch.as_tensor(example))}


def summary_row(step: int, epoch: int, costs: dict[str, Any], device: torch.device, *, samples: float,
                train_seconds: float, eval_throughput: float | None, activation_bytes: int | None,
                evaluated_params: str) -> dict[str, Any]:
    """The ``summary`` row a run writes when it ends: ``costs`` (:func:`profile`), the peak memory
    and what measured it, the bytes saved for backward by one training batch, the training and
    evaluation images/s of this session and which parameters were evaluated."""
    row: dict[str, Any] = {"kind": "summary", "step": step, "epoch": epoch, **costs,
                           "peak_memory_mb": round(peak_memory_mb(device), 1),
                           "peak_memory_source": peak_memory_source(device),
                           "train_throughput": samples / max(train_seconds, 1e-9),
                           "eval_params": evaluated_params}
    if activation_bytes is not None:
        row["activation_memory_mb"] = round(activation_bytes / 2**20, 3)
    if eval_throughput is not None:
        row["eval_throughput"] = eval_throughput
    return row
