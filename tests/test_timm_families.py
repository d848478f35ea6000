"""Compiled models of several timm families: traced == eager, identity at init, only tuners train."""

from __future__ import annotations

import pytest
import timm
import torch

import utdsl
from utdsl.trace import trace
from utdsl.verify import verify

FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, depth=2), 32,
            "blocks.*.attn -> parallel adapter(dim=4)\nattn.qkv{q, v} -> parallel lowrank(r=2)\nmlp.fc2 -> sequential affine()"),
    "deit": ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2), 32,
             "blocks.* -> sequential adapter(dim=4)\nattn.proj -> parallel lowrank(r=2)"),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=24, depths=(2, 2), num_heads=(1, 2)), 56,
             "layers.*.blocks.*.attn -> parallel adapter(dim=4)\nattn.qkv{k, v} -> sequential affine(shift=false)\n"
             "layers.*.blocks.*.mlp -> parallel lowrank(r=2)"),
    "convnext": ("convnext_atto", dict(), 64,
                 "stages.*.blocks.* -> parallel adapter(dim=4)\nmlp.fc1 -> parallel lowrank(r=2)\nconv_dw -> sequential affine()"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_compiles_with_identity_at_init_and_trains_only_tuners(family):
    name, kwargs, size, spec = FAMILIES[family]
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=7, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(trace(base)(x), base(x), rtol=0, atol=0)
    tuned = utdsl.compile(spec + "\ntrain head", base, x)
    report = verify(base, tuned, x)
    assert report.ok and report.max_abs_diff == 0.0, report.lines()
    assert len(tuned.meta["utdsl"].plan.insertions) >= 3
    tuned.train()
    tuned(x).square().mean().backward()
    grads = {n for n, p in tuned.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert all(n.startswith(("tuners.", "head")) for n in grads)
