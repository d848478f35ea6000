"""Mixup and CutMix on a batch (recipe fields ``mixup_alpha``, ``cutmix_alpha``, ``mix_prob``,
``mix_switch_prob``).

Each batch is mixed with itself reversed (sample i with sample N-1-i, so any batch size works,
the middle sample of an odd batch with itself): with probability ``mix_prob`` the batch is
mixed, by CutMix with probability ``mix_switch_prob`` when both alphas are set (else by the one
that is), with one ``lam ~ Beta(alpha, alpha)`` for the batch. Mixup blends whole images,
``lam * x + (1 - lam) * x_rev``; CutMix pastes a box of about ``(1 - lam) * H * W`` pixels from
the reversed batch (centred on a uniform pixel, clipped to the image), and ``lam`` becomes the
exact share of pixels left uncovered.

The targets are soft: ``lam * onehot(y) + (1 - lam) * onehot(y_rev)`` (:meth:`Mixed.probs`). The
training loop's ``CrossEntropyLoss(label_smoothing=s)`` applies the recipe's smoothing to them
(``(1 - s) * p + s / C``, as for hard labels). A batch left unmixed keeps its class indices, so
with ``mix_prob < 1`` its loss is the plain smoothed cross-entropy.

Randomness: every draw comes from a NumPy generator seeded by the caller (the training loop
passes a seed made of (recipe seed, rank, epoch, batch)); torch's global generator, which
dropout and drop-path use, is not touched. A run and its exact resume therefore mix alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Mixer", "Mixed"]


@dataclass
class Mixed:
    """A batch after :class:`Mixer`: its ``images``, the original ``targets`` (class indices) and
    ``lam``, the weight of each sample's own target (1.0 and ``mode="none"`` when unmixed)."""

    images: torch.Tensor
    targets: torch.Tensor
    lam: float
    mode: str

    def probs(self, num_classes: int) -> torch.Tensor:
        """Soft targets ``(N, num_classes)``: ``lam * onehot(y) + (1 - lam) * onehot(y reversed)``."""
        onehot = torch.nn.functional.one_hot(self.targets.long(), num_classes).float()
        return onehot * self.lam + onehot.flip(0) * (1.0 - self.lam)

    def loss_targets(self, num_classes: int) -> torch.Tensor:
        """What the loss takes: class indices when unmixed, else :meth:`probs`."""
        return self.targets if self.mode == "none" else self.probs(num_classes)


class Mixer:
    """Mix batches as the module docstring says: ``mixer(images, targets, seed) -> Mixed``."""

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("a Mixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)

    @classmethod
    def from_recipe(cls, recipe) -> "Mixer | None":
        """The recipe's mixer, or None when neither mixup nor CutMix is on."""
        if recipe.mixup_alpha <= 0 and recipe.cutmix_alpha <= 0:
            return None
        return cls(recipe.mixup_alpha, recipe.cutmix_alpha, recipe.mix_prob, recipe.mix_switch_prob)

    def sample(self, rng: np.random.Generator) -> tuple[str, float]:
        """``(mode, lam)`` of a batch: mode ``none``, ``mixup`` or ``cutmix``."""
        if rng.random() >= self.prob:
            return "none", 1.0
        if self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob):
            return "cutmix", float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        return "mixup", float(rng.beta(self.mixup_alpha, self.mixup_alpha))

    @staticmethod
    def box(lam: float, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A CutMix box ``(y0, y1, x0, x1)`` of about ``(1 - lam)`` of the image, centred at a
        uniform pixel and clipped to the image."""
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        return y0, y1, x0, x1

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, seed: int) -> Mixed:
        """Mix ``images`` (``(N, C, H, W)``) drawing from a generator seeded with ``seed``."""
        rng = np.random.default_rng(seed)
        mode, lam = self.sample(rng)
        if mode == "mixup":
            images = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
        elif mode == "cutmix":
            height, width = images.shape[-2:]
            y0, y1, x0, x1 = self.box(lam, height, width, rng)
            reverse = images.flip(0)
            images = images.clone()
            images[..., y0:y1, x0:x1] = reverse[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        return Mixed(images, targets, lam, mode)
