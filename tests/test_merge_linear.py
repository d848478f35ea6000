"""utdsl.merge folds everything linear in what it tunes: linear (identity-activation) adapters,
sequential or parallel, after or before a linear or conv; affines seen through a patch embedding's
flatten/transpose and a LayerNorm2d's permutes; and what cannot fold exactly stays in the graph."""

from __future__ import annotations

import pytest
import timm
import torch

import utdsl
from utdsl.trace import trace

from .conftest import tiny_vit

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
LINEAR = "adapter(dim=8, activation=identity)"


def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Random non-zero values for everything that trains (an adapter's zero up projection too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def structure(model) -> list[tuple[str, str]]:
    """Module calls and attribute reads, in order (fx's numbering of traced constants aside)."""
    return [(n.op, "_tensor_constant" if n.target.startswith("_tensor_constant") else n.target)
            for n in model.graph.nodes if n.op in ("call_module", "get_attr")]


def tuner_nodes(model) -> list[str]:
    return [n.target for n in model.graph.nodes if n.op == "call_module" and n.target.startswith("tuners.")]


def merged_and_tuned(spec: str, base: torch.nn.Module, x: torch.Tensor = X):
    tuned = utdsl.compile(spec, base, x)
    perturb(tuned)
    merged = utdsl.merge(tuned)
    torch.testing.assert_close(merged(x), tuned(x), rtol=1e-5, atol=1e-5)
    return merged, tuned


@pytest.mark.parametrize("spec", ["ssf", "ia3", "lora", "lora_weight", "dora", "vera", "loha", "lokr", "oft",
                                  "boft", "fact_tt", "fact_tk"])
def test_reparameterisable_library_specs_merge_to_the_base_structure(spec):
    base = tiny_vit()
    merged, _ = merged_and_tuned(spec, base)
    assert not tuner_nodes(merged)
    assert structure(merged) == structure(trace(base))
    assert set(merged.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("spec", [
    f"blocks.*.attn | blocks.*.mlp -> sequential {LINEAR}",                           # RepAdapter: after proj, fc2
    f"attn.qkv{{q, v}} -> sequential {LINEAR}",                                        # per chunk of a fused linear
    f"mlp.act -> sequential {LINEAR}",                                                 # before fc2 (its only user)
    f"mlp.fc1 | attn.proj -> parallel {LINEAR}",                                       # W + s U D
    "attn.qkv{q, v} -> parallel adapter(dim=4, activation=identity, scale=learned)",
    f"^patch_embed -> sequential {LINEAR}",                                            # conv, flatten, transpose
    "^patch_embed | ^norm -> sequential affine()",
])
def test_linear_adapters_fold_to_the_base_structure(spec):
    base = tiny_vit()
    merged, _ = merged_and_tuned(spec, base)
    assert not tuner_nodes(merged)
    assert structure(merged) == structure(trace(base))


@pytest.mark.parametrize("spec, left", [
    ("blocks.*.mlp -> sequential adapter(dim=8, activation=relu)", 2),                 # not linear
    ("blocks.*.mlp -> sequential adapter(dim=8, activation=identity, norm=true)", 2),  # a LayerNorm inside
    ("blocks.*.mlp -> sequential adapter(dim=8, activation=identity, dropout=0.1)", 2),  # train mode differs
    (f"blocks.*.mlp -> parallel {LINEAR}", 2),                                         # h is no linear of x
    (f"blocks.*.norm1 -> sequential {LINEAR}", 2),                                     # a norm is per channel
])
def test_what_is_not_linear_in_a_weight_stays(spec, left):
    merged, tuned = merged_and_tuned(spec, tiny_vit())
    assert len(tuner_nodes(merged)) == left
    tuned.train(), merged.train()
    torch.manual_seed(0)
    out = tuned(X)
    torch.manual_seed(0)
    torch.testing.assert_close(merged(X), out, rtol=1e-5, atol=1e-5)


def test_a_scale_on_one_factor_of_a_product_folds_into_the_other_factors_linear():
    from timm.layers import SwiGLU

    base = tiny_vit(mlp_layer=SwiGLU)  # act(fc1_g(x)) * fc1_x(x)
    merged, _ = merged_and_tuned("ia3", base)
    assert not tuner_nodes(merged)
    assert structure(merged) == structure(trace(base))
    merged, _ = merged_and_tuned("mlp.act -> sequential affine()", base)  # a shift does not commute
    assert len(tuner_nodes(merged)) == 2


def test_repadapter_fold_is_the_algebra():
    """W' = (I + s U D) W and b' = (I + s U D) b + s (U b_D + b_U)."""
    base = tiny_vit()
    merged, tuned = merged_and_tuned(f"blocks.0.mlp -> sequential {LINEAR}", base)
    unit = tuned.get_submodule("tuners.blocks.0.mlp.sequential_adapter").units["full"]
    fc2 = base.blocks[0].mlp.fc2
    mix = unit.scale * unit.up.weight @ unit.down.weight
    torch.testing.assert_close(merged.get_parameter("blocks.0.mlp.fc2.weight"), fc2.weight + mix @ fc2.weight)
    torch.testing.assert_close(merged.get_parameter("blocks.0.mlp.fc2.bias"),
                               fc2.bias + mix @ fc2.bias + unit.scale * (unit.up.weight @ unit.down.bias + unit.up.bias))


def test_conv_adapters_fold_into_ungrouped_convs_only():
    torch.manual_seed(0)
    base = timm.create_model("resnet10t", num_classes=3).eval()
    x = torch.randn(2, 3, 40, 56)
    merged, _ = merged_and_tuned(f"layer1.0.conv1 | layer2.0.downsample.1 -> sequential {LINEAR}\n"
                                 f"layer1.0.bn1 -> sequential {LINEAR}", base, x)
    assert tuner_nodes(merged) == ["tuners.layer1.0.bn1.sequential_adapter"]  # BN: per channel only
    torch.manual_seed(0)
    convnext = timm.create_model("convnext_atto", num_classes=3).eval()
    merged, _ = merged_and_tuned(f"stages.0.blocks.0.conv_dw -> sequential {LINEAR}\n"
                                 "stages.0.blocks.1.conv_dw -> sequential affine()", convnext, x)
    assert tuner_nodes(merged) == ["tuners.stages.0.blocks.0.conv_dw.sequential_adapter"]  # depthwise


def test_affines_fold_after_layernorm2d_through_its_permutes_and_before_a_pointwise_conv():
    torch.manual_seed(0)
    base = timm.create_model("convnext_atto", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    merged, tuned = merged_and_tuned("stem.1 | stages.*.downsample.0 -> sequential affine()\n"
                                     "stages.0.blocks.0.mlp.norm -> sequential affine()", base, x)  # before a 1x1 conv
    assert not tuner_nodes(merged)
    assert structure(merged) == structure(trace(base))
    unit = tuned.get_submodule("tuners.stem.1.sequential_affine").units["full"]
    torch.testing.assert_close(merged.get_parameter("stem.1.bias"), base.stem[1].bias * unit.scale + unit.shift)


def test_linear_adapters_on_a_functional_qkv_fold_where_k_bias_keeps_its_zeros():
    torch.manual_seed(0)
    base = timm.create_model("beit_base_patch16_224", num_classes=5, img_size=32, depth=2, embed_dim=64,
                             num_heads=2).eval()
    for spec, left in [(f"attn.qkv{{q, v}} -> sequential {LINEAR}", 0),
                       (f"attn.qkv{{q, v}} -> parallel {LINEAR}", 0),
                       (f"attn.qkv{{k}} -> parallel {LINEAR}", 2),     # a shift for the k_bias buffer
                       (f"attn.qkv -> sequential {LINEAR}", 2)]:
        merged, tuned = merged_and_tuned(spec, base)
        assert len(tuner_nodes(merged)) == left, spec
        assert torch.equal(merged.get_buffer("blocks.0.attn.k_bias"), base.blocks[0].attn.k_bias)
        if not left:
            assert structure(merged) == structure(trace(base))
