"""Mixup and CutMix on a batch (recipe fields ``mixup_alpha``, ``cutmix_alpha``, ``mix_prob``,
``mix_switch_prob``).

Each batch is mixed with itself reversed (sample i with sample N-1-i, so any batch size works):
with probability ``mix_prob`` the batch is mixed, by CutMix with probability ``mix_switch_prob``
when both alphas are set (else by the one that is), with ``lam ~ Beta(alpha, alpha)``. Mixup
blends whole images, ``lam * x + (1 - lam) * x_rev``; CutMix pastes a box of area about
``(1 - lam) * H * W`` from the reversed batch, and ``lam`` becomes the exact uncovered share.
Targets become ``lam * onehot(y) + (1 - lam) * onehot(y_rev)``; the loss (cross-entropy on
probabilities) applies the recipe's label smoothing on top. Random numbers come from torch's
global generator, which the training loop seeds for every batch, so runs stay reproducible.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Mixer"]


class Mixer:
    """Mix batches as the module docstring says; ``__call__(images, targets) -> (images, probs)``."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("a Mixer needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)

    def _beta(self, alpha: float) -> float:
        return float(torch.distributions.Beta(alpha, alpha).sample())

    def sample(self) -> tuple[str, float]:
        """``(mode, lam)`` for the next batch: mode ``none``, ``mixup`` or ``cutmix``."""
        if float(torch.rand(())) >= self.prob:
            return "none", 1.0
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or float(torch.rand(())) < self.switch_prob)
        if use_cutmix:
            return "cutmix", self._beta(self.cutmix_alpha)
        return "mixup", self._beta(self.mixup_alpha)

    @staticmethod
    def box(lam: float, height: int, width: int) -> tuple[int, int, int, int]:
        """A CutMix box ``(y0, y1, x0, x1)`` of about ``(1 - lam)`` of the image, centred at a
        random pixel and clipped to the image."""
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        return y0, y1, x0, x1

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mode, lam = self.sample()
        onehot = torch.nn.functional.one_hot(targets.long(), self.num_classes).float()
        if mode == "none":
            return images, onehot
        reverse = images.flip(0)
        if mode == "mixup":
            images = images * lam + reverse * (1.0 - lam)
        else:
            height, width = images.shape[-2:]
            y0, y1, x0, x1 = self.box(lam, height, width)
            images = images.clone()
            images[..., y0:y1, x0:x1] = reverse[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        return images, onehot * lam + onehot.flip(0) * (1.0 - lam)
