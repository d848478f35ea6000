"""The weight placement's activation form: where a tuned linear's weight is read by that one call,
the call's output is computed without forming W' (LoRA, VeRA, FacT add an output delta, OFT rotates
the input), so the backward keeps no W' and pays no dense weight gradient. Outputs and gradients
equal the weight form; merge, export and stacked rules still see W' = U(W)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import utdsl
from utdsl.placements.weight import LOWERED_CALL, WeightJoint, restore_weight_form

from .conftest import tiny_vit
from .test_weight_placement import X, perturb, tuned_weights

LOWERED = [
    "attn.qkv{q, v} -> weight lora(r=4)",
    "attn.qkv -> weight lora(r=4, alpha=8)",
    "attn.qkv{k} | mlp.fc2 -> weight vera(r=16)",
    "attn.qkv{q, k, v} | attn.proj | mlp.fc1 | mlp.fc2 -> weight fact_tt(r=4, scale=3)",
    "attn.qkv{q, k, v} | attn.proj | mlp.fc1 | mlp.fc2 -> weight fact_tk(r=4)",
    "attn.qkv -> weight oft(block_size=4)",
    "attn.qkv{q, v} -> weight oft(block_size=8)",
    "attn.qkv{v} -> weight oft(block_size=8)",
]
WEIGHT_FORM = [
    "attn.qkv -> weight dora(r=4)",
    "attn.qkv -> weight loha(r=4)",
    "attn.qkv -> weight lokr(r=4)",
    "attn.qkv -> weight boft(block_size=4)",
    "attn.qkv -> weight hadamard(r=4)",
    "patch_embed.proj -> weight lora(r=2)",                    # a conv: no linear call to lower
    "attn.qkv -> weight lora(r=2)\nattn.qkv -> weight oft(block_size=4)",   # stacked: W' feeds W''
]


def joint_nodes(model):
    return [n for n in model.graph.nodes
            if n.op == "call_module" and isinstance(model.get_submodule(n.target), WeightJoint)]


@pytest.mark.parametrize("spec", LOWERED)
def test_activation_form_replaces_the_linear_call_and_equals_the_weight_form(spec):
    base, x = tiny_vit().double(), X.double()   # float64: the two forms differ by rounding only
    tuned = utdsl.compile(spec + "\ntrain @classifier", base, x)
    joints = joint_nodes(tuned)
    assert joints and all(LOWERED_CALL in n.meta and "input" in n.kwargs for n in joints)
    torch.testing.assert_close(tuned(x), base(x), rtol=0, atol=1e-12)
    perturb(tuned)
    heads = {n: p for n, p in tuned.named_parameters() if n.startswith("head")}
    expected = functional_call(base, {**tuned_weights(tuned), **heads}, (x,))
    got = tuned(x)
    assert not torch.allclose(got, base(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    grads = torch.autograd.grad(got.square().sum(), trainable)
    reference = functional_call(base, {**tuned_weights(tuned), **heads}, (x,))
    for g, r in zip(grads, torch.autograd.grad(reference.square().sum(), trainable)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", WEIGHT_FORM)
def test_tuners_without_an_activation_form_keep_the_weight_form(spec):
    tuned = utdsl.compile(spec, tiny_vit(), X)
    joints = joint_nodes(tuned)
    assert joints and not any(LOWERED_CALL in n.meta for n in joints)


def test_restoring_the_weight_form_gives_the_same_graph_as_before_lowering():
    tuned = utdsl.compile("attn.qkv{q, v} -> weight lora(r=4)", tiny_vit(), X)
    perturb(tuned)
    before = tuned(X)
    restore_weight_form(tuned)
    tuned.recompile()
    assert not any(LOWERED_CALL in n.meta for n in tuned.graph.nodes)
    linears = [n for n in tuned.graph.nodes if n.target is torch.nn.functional.linear
               and isinstance(n.args[1], torch.fx.Node) and n.args[1].op == "call_module"]
    assert len(linears) == len(joint_nodes(tuned)) == 2   # depth-2 tiny ViT: one per block
    torch.testing.assert_close(tuned(X), before, rtol=1e-5, atol=1e-5)


def saved_shapes(model, x):
    """Shapes of every tensor autograd keeps for the backward of one forward, parameters and
    views of them excluded (they cost no memory)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return shapes


@pytest.mark.parametrize("spec, kept", [
    ("attn.qkv -> weight lora(r=4)", 0),       # activation form: no W'
    ("attn.qkv -> weight oft(block_size=4)", 0),
    ("attn.qkv -> weight loha(r=4)", 1),       # W' for F.linear; the two products are rebuilt
])
def test_backward_keeps_no_weight_sized_tensor_beyond_w_prime(spec, kept):
    tuned = utdsl.compile(spec, tiny_vit(), X)
    out, features = tuned.get_parameter("blocks.0.attn.qkv.weight").shape
    shapes = saved_shapes(tuned, X)
    # block 0's input needs no gradient, so only block 1's call keeps its (transposed) weight
    assert sum(s in ((out, features), (features, out)) for s in shapes) == kept
