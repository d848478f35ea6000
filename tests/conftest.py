"""Shared fixtures: small real models for behaviour, meta-device base models for exact counts."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn


def tiny_vit(**kwargs) -> nn.Module:
    """A 2-block ViT-Tiny on 32x32 images: 5 tokens, 192 channels, 3 heads."""
    options = dict(img_size=32, depth=2, num_classes=10)
    options.update(kwargs)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **options).eval()


def meta_model(name: str = "vit_base_patch16_224", **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def trainable_without_head(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head"))


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture
def cli(capsys):
    """Run the ``utdsl`` command line in-process: ``cli("check", "lora") -> (exit code, out, err)``."""
    from utdsl.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            main(list(argv))
            code = 0
        except SystemExit as done:
            code = done.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
