"""Every selector form of the README table, resolved against a real 12-block ViT-B/16 (meta
device), and the ``@classifier`` role across backbones that name their classifier differently."""

from __future__ import annotations

import pytest
import torch

import utdsl
from utdsl.errors import SpecError
from utdsl.resolve import resolve

from .conftest import meta_model


@pytest.fixture(scope="module")
def vit12():
    return meta_model("vit_base_patch16_224", num_classes=10)


def sites(model, selector: str) -> list[str]:
    checked = utdsl.compiler._as_checked_spec(f"{selector} -> sequential affine()", None)
    return [b.path for b in resolve(checked, model).bindings]


def blocks(*indices: int, tail: str = "") -> list[str]:
    return [f"blocks.{i}{tail}" for i in indices]


@pytest.mark.parametrize("selector, expected", [
    ("attn.qkv", blocks(*range(12), tail=".attn.qkv")),
    ("^norm", ["norm"]),
    ("norm", ["norm", "patch_embed.norm", *(f"blocks.{i}.{m}.norm" for i in range(12) for m in ("attn", "mlp"))]),
    ("blocks.*.mlp", blocks(*range(12), tail=".mlp")),
    ("blocks[0:6].attn", blocks(0, 1, 2, 3, 4, 5, tail=".attn")),
    ("blocks[11]", ["blocks.11"]),
    ("blocks[:2, 10:]", blocks(0, 1, 10, 11)),
    ("blocks[0, 11]", blocks(0, 11)),
    ("blocks[3:5, 7, 9:10].attn.proj", blocks(3, 4, 7, 9, tail=".attn.proj")),
    ("blocks[10:].(attn | mlp)", ["blocks.10.attn", "blocks.10.mlp", "blocks.11.attn", "blocks.11.mlp"]),
    ("attn.qkv | mlp.fc1", [p for i in range(12) for p in (f"blocks.{i}.attn.qkv", f"blocks.{i}.mlp.fc1")]),
    ("^blocks", ["blocks"]),
    ("^blocks.**.fc2", blocks(*range(12), tail=".mlp.fc2")),
    ("@classifier", ["head"]),
])
def test_selector_forms_on_a_12_block_vit(vit12, selector, expected):
    assert sorted(sites(vit12, selector)) == sorted(expected)


def test_chunks_bind_the_fused_module_once_per_site(vit12):
    tuned = utdsl.compile("blocks[:2, 10:].attn.qkv{q, v} -> parallel lowrank(r=4)", vit12,
                          torch.empty(1, 3, 224, 224, device="meta"))
    insertions = tuned.meta["utdsl"].plan.insertions
    assert [i.site for i in insertions] == blocks(0, 1, 10, 11, tail=".attn.qkv")
    assert all(i.chunks.indices == (0, 2) for i in insertions)
    assert sum(i.params for i in insertions) == 4 * 2 * 4 * (768 + 768)


def test_bitfit_style_parameter_selectors_with_index_lists(vit12):
    spec = utdsl.compiler._as_checked_spec("train blocks[0, 11].**.bias", None)
    trained = resolve(spec, vit12).trained
    assert trained and all(n.startswith(("blocks.0.", "blocks.11.")) and n.endswith("bias") for n in trained)
    assert len(trained) == 2 * 6    # norm1, qkv, proj, norm2, fc1, fc2


@pytest.mark.parametrize("name, kwargs, expected", [
    ("vit_tiny_patch16_224", {}, ["head.weight", "head.bias"]),
    ("resnet18", {}, ["fc.weight", "fc.bias"]),
    ("efficientnet_b0", {}, ["classifier.weight", "classifier.bias"]),
    ("convnext_atto", {}, ["head.fc.weight", "head.fc.bias"]),
    ("deit_tiny_distilled_patch16_224", {}, ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]),
])
def test_classifier_role_finds_each_familys_classifier(name, kwargs, expected):
    spec = utdsl.compiler._as_checked_spec("train @classifier", None)
    assert resolve(spec, meta_model(name, num_classes=7, **kwargs)).trained == expected


def test_classifier_role_of_a_headless_model_warns_and_trains_nothing():
    spec = utdsl.compiler._as_checked_spec("attn.qkv -> parallel lowrank(r=2)\ntrain @classifier", None)
    bound = resolve(spec, meta_model("vit_tiny_patch16_224", num_classes=0))
    assert bound.trained == []
    (warning,) = bound.warnings
    assert (warning.span.line, warning.span.column) == (2, 7)
    assert "has no classifier" in warning.message


def test_a_tuner_on_a_missing_role_is_an_error_at_the_selector():
    with pytest.raises(SpecError) as caught:
        utdsl.compile("@classifier -> parallel lowrank(r=2)", meta_model("vit_tiny_patch16_224", num_classes=0),
                      torch.empty(1, 3, 224, 224, device="meta"))
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.span.line, diagnostic.span.column) == (1, 1)
    assert "has no classifier" in diagnostic.hint


def test_unknown_role_is_a_check_error_with_the_closest_role():
    with pytest.raises(SpecError) as caught:
        utdsl.compiler._as_checked_spec("let r = 2\ntrain @clasifier", None)
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 7)
    assert diagnostic.message == "unknown role '@clasifier'"
    assert "@classifier" in diagnostic.hint


def test_role_paths_print_back_as_written():
    spec = utdsl.parse_spec("train @classifier.bias | head")
    assert str(spec.param_rules[0].selector) == "@classifier.bias | head"
