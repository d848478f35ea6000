"""Helpers of the training tests: a tiny compiled model, separable data, a fast recipe."""

from __future__ import annotations

import torch
from torch import nn

import utdsl
from torch.utils.data import TensorDataset

from utdsl.runtime.recipes import Recipe

TINY_SPEC = 'spec tiny "LoRA on fc1, train the head"\nfc1 -> parallel lowrank(r=2)\ntrain head\n'
FEATURES = 8


class Tiny(nn.Module):
    def __init__(self, classes: int = 3, dropout: float = 0.1):
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 16)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.drop(self.act(self.fc1(x.flatten(1)))))


def tiny_model(classes: int = 3, dropout: float = 0.1, seed: int = 0, tuner_seed: int | None = None) -> nn.Module:
    """The tiny model with LoRA on fc1 and a trained head; the base is initialised from ``seed``
    (it stands for pretrained weights), the tuners from ``tuner_seed`` (default: go on from it)."""
    torch.manual_seed(seed)
    base = Tiny(classes, dropout)
    if tuner_seed is not None:
        torch.manual_seed(tuner_seed)
    return utdsl.compile(TINY_SPEC, base, torch.zeros(2, FEATURES), inplace=True, model_name="tiny")


def blobs(n: int = 48, classes: int = 3, seed: int = 0) -> TensorDataset:
    """``n`` points in ``classes`` well separated Gaussian clusters."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, FEATURES, generator=generator) * 3
    points = centres[labels] + torch.randn(n, FEATURES, generator=generator) * 0.5
    return TensorDataset(points, labels)


def fast_recipe(**fields) -> Recipe:
    values = dict(name="test", lr=0.05, epochs=3, warmup_epochs=1, batch_size=8, weight_decay=0.01,
                  log_every=1, seed=0, precision="fp32")
    values.update(fields)
    return Recipe(**values)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
