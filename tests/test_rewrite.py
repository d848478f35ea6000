"""Stage rewrite (through utdsl.compile): placements on leaves and containers, exact formulas,
stacking order, base weight names, and the caller's model left untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import utdsl

from .conftest import tiny_vit


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.fc(x)) * 2


class Toy(nn.Module):
    """in 4 -> fc1 6 -> inner (container) 6 -> fc2 3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 6)
        self.inner = Inner()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.inner(self.fc1(x)))


def randomize(model: nn.Module) -> None:
    torch.manual_seed(7)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.3)


X = torch.randn(5, 4)


def test_parallel_on_a_container_is_op_plus_tuner_of_the_input():
    base = Toy()
    tuned = utdsl.compile("inner -> parallel adapter(dim=2)", base, X)
    randomize(tuned)
    unit = tuned.get_submodule("tuners.inner.parallel_adapter").units["full"]
    h = base.fc1(X)
    expected = base.fc2(base.inner(h) + unit(h))
    torch.testing.assert_close(tuned(X), expected, rtol=0, atol=1e-6)


def test_sequential_on_a_leaf_is_residual_tuner_of_the_output():
    base = Toy()
    tuned = utdsl.compile("fc1 -> sequential adapter(dim=3)", base, X)
    randomize(tuned)
    unit = tuned.get_submodule("tuners.fc1.sequential_adapter").units["full"]
    h = base.fc1(X)
    torch.testing.assert_close(tuned(X), base.fc2(base.inner(h + unit(h))), rtol=0, atol=1e-6)


def test_affine_is_residual_free():
    base = Toy()
    tuned = utdsl.compile("fc2 -> sequential affine()", base, X)
    randomize(tuned)
    unit = tuned.get_submodule("tuners.fc2.sequential_affine").units["full"]
    torch.testing.assert_close(tuned(X), base(X) * unit.scale + unit.shift, rtol=0, atol=1e-6)


def test_rules_on_one_site_stack_in_spec_order():
    spec = "fc1 -> parallel lowrank(r=2)\nfc1 -> sequential affine()\n"
    base = Toy()
    tuned = utdsl.compile(spec, base, X)
    randomize(tuned)
    lora = tuned.get_submodule("tuners.fc1.parallel_lowrank").units["full"]
    affine = tuned.get_submodule("tuners.fc1.sequential_affine").units["full"]
    h = affine(base.fc1(X) + lora(X))
    torch.testing.assert_close(tuned(X), base.fc2(base.inner(h)), rtol=0, atol=1e-6)


def test_nested_rules_compose_the_inner_tuner_inside_the_outer_site():
    spec = "inner -> parallel adapter(dim=2)\ninner.fc -> parallel lowrank(r=2)\n"
    base = Toy()
    tuned = utdsl.compile(spec, base, X)
    randomize(tuned)
    outer = tuned.get_submodule("tuners.inner.parallel_adapter").units["full"]
    lora = tuned.get_submodule("tuners.inner.fc.parallel_lowrank").units["full"]
    h = base.fc1(X)
    inner = torch.tanh(base.inner.fc(h) + lora(h)) * 2
    torch.testing.assert_close(tuned(X), base.fc2(inner + outer(h)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.5])  # 0: lowrank's fused block-matrix path; 0.5: per chunk
def test_chunks_tune_only_their_part_of_a_fused_output(dropout):
    base = Toy()
    tuned = utdsl.compile(f"fc1{{0, 2 of 3}} -> parallel lowrank(r=1, dropout={dropout})", base, X).eval()
    randomize(tuned)
    joint = tuned.get_submodule("tuners.fc1.parallel_lowrank")
    assert list(joint.units) == ["0", "2"]
    h = base.fc1(X)
    parts = list(h.chunk(3, dim=-1))
    parts[0] = parts[0] + joint.units["0"](X)
    parts[2] = parts[2] + joint.units["2"](X)
    torch.testing.assert_close(tuned(X), base.fc2(base.inner(torch.cat(parts, -1))), rtol=0, atol=1e-6)


def test_base_weights_keep_their_names_and_a_pretrained_state_dict_loads():
    base = tiny_vit()
    tuned = utdsl.compile("lora", base)
    result = tuned.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("tuners.") for k in result.missing_keys)
    for name, p in base.state_dict().items():
        assert torch.equal(tuned.state_dict()[name], p)


def test_the_callers_model_is_not_modified():
    base = tiny_vit()
    before = {n: (p.requires_grad, p.clone()) for n, p in base.named_parameters()}
    modules = [n for n, _ in base.named_modules()]
    tuned = utdsl.compile("adapter", base)
    randomize(tuned)
    assert [n for n, _ in base.named_modules()] == modules
    for name, p in base.named_parameters():
        assert p.requires_grad == before[name][0]
        assert torch.equal(p, before[name][1])


def test_inplace_compiles_into_the_given_model():
    base = tiny_vit()
    tuned = utdsl.compile("lora", base, inplace=True)
    assert tuned.get_submodule("blocks.0.attn.qkv") is base.blocks[0].attn.qkv
    assert not base.blocks[0].attn.qkv.weight.requires_grad


def test_gradients_reach_only_tuners_and_trained_parameters(images):
    tuned = utdsl.compile("spec t\nblocks.*.attn -> parallel adapter(dim=4)\ntrain head\n", tiny_vit())
    tuned(images).sum().backward()
    for name, p in tuned.named_parameters():
        should = name.startswith("tuners.") or name.startswith("head")
        assert (p.grad is not None) == should, name


def test_channels_first_sites_get_tuners_on_the_channel_axis():
    import timm

    base = timm.create_model("convnext_atto", num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    tuned = utdsl.compile("stages.*.blocks.0 -> sequential adapter(dim=4)\nstages.0.blocks.0.conv_dw -> sequential affine()", base, x)
    plan = tuned.meta["utdsl"].plan
    axes = {i.site: (i.in_axis, i.info.out_features) for i in plan.insertions}
    assert axes["stages.0.blocks.0"] == (1, 40)       # NCHW block output: channels on axis 1
    assert axes["stages.0.blocks.0.conv_dw"] == (1, 40)
    assert axes["stages.3.blocks.0"] == (1, 320)
    randomize(tuned)
    assert tuned(x).shape == (1, 5)


def test_a_module_never_called_is_an_error_at_the_rule():
    class Unused(Toy):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(2, 2)

    with pytest.raises(utdsl.SpecError) as caught:
        utdsl.compile("train fc2\nspare -> parallel lowrank(r=1)\n", Unused(), X)
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.line, diagnostic.column) == (2, 1)
    assert "spare: this module is never called" in diagnostic.message


def test_frozen_weights_share_storage_with_the_callers_model_and_trained_ones_do_not():
    base = tiny_vit()
    tuned = utdsl.compile("lora", base)
    assert tuned.get_parameter("blocks.0.attn.qkv.weight").data_ptr() == base.blocks[0].attn.qkv.weight.data_ptr()
    assert tuned.get_parameter("head.weight").data_ptr() != base.head.weight.data_ptr()
    assert tuned.get_parameter("head.weight") is not base.head.weight
