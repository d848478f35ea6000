"""The ``weight`` placement: W' = U(W) wherever W is read (a leaf call or a functional use), chunks
of fused weights, state shared by a rule's sites counted and saved once, exact merge back to the
base model's structure, and clear errors where a site has no weight."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.func import functional_call

import utdsl
from utdsl.errors import SpecError
from utdsl.trace import trace

from .conftest import tiny_vit

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

WEIGHT_SPECS = [
    "attn.qkv{q, v} -> weight lora(r=4)",
    "attn.qkv | mlp.fc1 -> weight dora(r=4)",
    "attn.qkv | attn.proj | mlp.fc1 | mlp.fc2 -> weight vera(r=16)",
    "attn.qkv -> weight loha(r=4)",
    "attn.qkv -> weight lokr(r=4)",
    "attn.qkv -> weight oft(r=4)",
    "attn.qkv -> weight boft(block_size=4)",
    "attn.qkv -> weight hadamard(r=4)",
    "attn.qkv{q, k, v} | attn.proj | mlp.fc1 | mlp.fc2 -> weight fact_tt(r=8)",
    "attn.qkv{q, k, v} | attn.proj | mlp.fc1 | mlp.fc2 -> weight fact_tk(r=8)",
    "patch_embed.proj -> weight lora(r=2)",
]


def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def tuned_weights(model) -> dict[str, torch.Tensor]:
    """Every tuned weight as the compiled model computes it: each joint applied to its weight."""
    out = {}
    for insertion in model.meta["utdsl"].plan.insertions:
        name = f"{insertion.site}.weight"
        current = out.get(name, model.get_parameter(name))
        out[name] = model.get_submodule(insertion.module_name)(current)
    return out


@pytest.mark.parametrize("spec", WEIGHT_SPECS)
def test_weight_tuners_are_the_base_at_init_and_the_base_with_tuned_weights_after(spec):
    base = tiny_vit()
    tuned = utdsl.compile(spec + "\ntrain @classifier", base, X)
    torch.testing.assert_close(tuned(X), base(X), rtol=0, atol=0)
    plan = tuned.meta["utdsl"].plan
    assert utdsl.trainable_parameters(tuned) == plan.trainable_params
    perturb(tuned)
    weights = tuned_weights(tuned)
    heads = {n: p for n, p in tuned.named_parameters() if n.startswith("head")}
    expected = functional_call(base, {**weights, **heads}, (X,))
    got = tuned(X)
    assert not torch.allclose(got, base(X))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # every gradient: the compiled graph against the base model called with the tuned weights
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    grads = torch.autograd.grad(got.square().sum(), trainable)
    reference = functional_call(base, {**tuned_weights(tuned), **heads}, (X,))
    for g, r in zip(grads, torch.autograd.grad(reference.square().sum(), trainable)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", WEIGHT_SPECS)
def test_merge_is_exact_and_restores_the_base_structure(spec):
    base = tiny_vit()
    tuned = utdsl.compile(spec, base, X)
    perturb(tuned)
    merged = utdsl.merge(tuned)
    torch.testing.assert_close(merged(X), tuned(X), rtol=1e-5, atol=1e-5)
    assert not any(n.startswith("tuners") for n, _ in merged.named_parameters())
    assert not any(n.startswith("tuners") for n, _ in merged.named_buffers())
    base_calls = [(n.op, n.target) for n in trace(base).graph.nodes if n.op in ("call_module", "get_attr")]
    assert [(n.op, n.target) for n in merged.graph.nodes if n.op in ("call_module", "get_attr")] == base_calls
    assert set(merged.state_dict()) == set(base.state_dict())


def test_weight_lora_equals_parallel_lowrank_on_a_linear():
    base = tiny_vit()
    weight = utdsl.compile("attn.qkv{q, v} -> weight lora(r=4, alpha=8)", base, X)
    output = utdsl.compile("attn.qkv{q, v} -> parallel lowrank(r=4, alpha=8)", base, X)
    perturb(weight)
    with torch.no_grad():
        for insertion in weight.meta["utdsl"].plan.insertions:
            units = weight.get_submodule(insertion.module_name).units
            twins = output.get_submodule(insertion.module_name.replace("weight_lora", "parallel_lowrank")).units
            for label, unit in units.items():
                twins[label].down.weight.copy_(unit.lora_A)
                twins[label].up.weight.copy_(unit.lora_B)
    a, b = weight(X), output(X)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), [p for p in weight.parameters() if p.requires_grad])
    gb = torch.autograd.grad(b.square().sum(), [p for p in output.parameters() if p.requires_grad])
    for x, y in zip(ga, gb):   # lora_A/lora_B and down/up in the same order, same shapes
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_shared_state_is_counted_saved_and_trained_once(tmp_path):
    base = tiny_vit()
    spec = "attn.qkv{q, k, v} | attn.proj | mlp.fc1 | mlp.fc2 -> weight fact_tt(r=8)"
    tuned = utdsl.compile(spec, base, X)
    plan = tuned.meta["utdsl"].plan
    shared = [n for n, _ in tuned.named_parameters() if ".shared." in n]
    assert len(shared) == 2 and plan.shared_params == 2 * 8 * 192          # U and V, once
    assert utdsl.trainable_parameters(tuned) == plan.tuner_params
    perturb(tuned)
    path = utdsl.save_tuners(tuned, tmp_path / "fact.safetensors")
    assert sum(".shared." in k for k in load_file(str(path))) == 2
    again = utdsl.compile(spec, base, X)
    utdsl.load_tuners(again, path)
    assert torch.equal(again(X), tuned(X))


def test_veras_frozen_projections_travel_with_the_checkpoint(tmp_path):
    base = tiny_vit()
    spec = "attn.qkv | mlp.fc2 -> weight vera(r=16)"
    tuned = utdsl.compile(spec, base, X)
    perturb(tuned)
    path = utdsl.save_tuners(tuned, tmp_path / "vera.safetensors")
    saved = load_file(str(path))
    assert {k.rsplit(".", 1)[-1] for k in saved if ".shared." in k} == {"vera_A", "vera_B"}
    again = utdsl.compile(spec.replace("vera(r=16)", "vera(r=16, projection_prng_key=7)"), base, X)
    with pytest.raises(utdsl.CheckpointError, match="projection_prng_key"):
        utdsl.load_tuners(again, path)


def test_a_functional_weight_and_a_conv_weight():
    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", img_size=32, depth=1, embed_dim=32, num_heads=2,
                             num_classes=3).eval()
    tuned = utdsl.compile("attn.qkv{q, v} -> weight dora(r=2)", beit, X)   # F.linear(x, qkv.weight, qkv_bias)
    torch.testing.assert_close(tuned(X), beit(X), rtol=0, atol=0)
    perturb(tuned)
    expected = functional_call(beit, tuned_weights(tuned), (X,))
    torch.testing.assert_close(tuned(X), expected, rtol=1e-5, atol=1e-5)
    resnet = timm.create_model("resnet10t", num_classes=3).eval()
    x = torch.randn(2, 3, 40, 48)
    conv = utdsl.compile("layer1.0.conv1 | downsample.1 -> weight lora(r=2)", resnet, x)
    perturb(conv)
    torch.testing.assert_close(conv.eval()(x), functional_call(resnet, tuned_weights(conv), (x,)), rtol=1e-5, atol=1e-5)
    merged = utdsl.merge(conv)
    torch.testing.assert_close(merged(x), conv(x), rtol=1e-5, atol=1e-5)


def test_stacked_weight_rules_compose_in_spec_order():
    base = tiny_vit()
    tuned = utdsl.compile("attn.qkv -> weight lora(r=2)\nattn.qkv -> weight oft(r=4)", base, X)
    perturb(tuned)
    first, second = (tuned.get_submodule(i.module_name) for i in tuned.meta["utdsl"].plan.insertions
                     if i.site == "blocks.0.attn.qkv")
    w = base.blocks[0].attn.qkv.weight
    torch.testing.assert_close(tuned_weights(tuned)["blocks.0.attn.qkv.weight"], second(first(w)))


@pytest.mark.parametrize("spec, column, message", [
    ("blocks.*.attn -> weight lora(r=2)", 1, "weight needs a module with a matrix or conv weight; Attention has none"),
    ("let r = 2\nnorm1 -> weight lora(r=r)", 1, "weight needs a module with a matrix or conv weight; LayerNorm has none"),
    ("attn.qkv{0 of 5} -> weight lora(r=2)", 1, "576 output rows do not split into 5 equal chunks"),
])
def test_sites_without_a_weight_are_errors_at_the_rule(spec, column, message):
    with pytest.raises(SpecError) as caught:
        utdsl.compile(spec, tiny_vit(), X)
    diagnostic = caught.value.diagnostics[0]
    assert (diagnostic.line, diagnostic.column) == (spec.count("\n") + 1, column)
    assert message in diagnostic.message


def test_one_reason_at_many_sites_is_one_diagnostic_naming_them():
    with pytest.raises(SpecError) as caught:
        utdsl.compile("blocks.*.attn -> weight lora(r=2)", tiny_vit(), X)
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.message.startswith("blocks.0.attn (and 1 more like it: blocks.1.attn): weight needs")
