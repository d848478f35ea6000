"""Weight tuners on raw parameters: ``pos_embed``, ``cls_token``, relative-position tables. The unit
sees the parameter as the matrix (rows, last dim); every read of the parameter reads U(W); merge
writes U(W) back; a rule of another placement on a parameter is an error that says why."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.func import functional_call

import utdsl
from utdsl.errors import SpecError

from .conftest import tiny_vit
from .test_weight_placement import X, perturb


def test_lora_on_pos_embed_and_cls_token_is_the_base_model_with_the_updated_parameters(tmp_path):
    base = tiny_vit()            # 32 px, patch 16: 4 patches + cls = 5 positions, width 192
    tuned = utdsl.compile("pos_embed -> weight lora(r=2, alpha=4)\ncls_token -> weight lora(r=1)", base, X)
    # pos_embed (1, 5, 192) as (5, 192): A 2x192 + B 5x2; cls_token (1, 1, 192): A 1x192 + B 1x1
    assert utdsl.trainable_parameters(tuned) == tuned.meta["utdsl"].plan.tuner_params == 394 + 193
    torch.testing.assert_close(tuned(X), base(X), rtol=0, atol=0)
    perturb(tuned)
    units = {i.site: tuned.get_submodule(i.module_name).units["full"] for i in tuned.meta["utdsl"].plan.insertions}

    def updated(name, scaling):
        w, unit = base.get_parameter(name), units[name]
        return w + (scaling * unit.lora_B @ unit.lora_A).reshape(w.shape)

    got = tuned(X)
    expected = functional_call(base, {"pos_embed": updated("pos_embed", 2.0),
                                      "cls_token": updated("cls_token", 1.0)}, (X,))
    assert not torch.allclose(got, base(X))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    for g, r in zip(torch.autograd.grad(got.square().sum(), trainable),
                    torch.autograd.grad(expected.square().sum(), trainable)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    merged = utdsl.merge(tuned)
    torch.testing.assert_close(merged(X), got, rtol=1e-5, atol=1e-5)
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(merged.get_parameter("pos_embed"), updated("pos_embed", 2.0), rtol=0, atol=1e-6)
    path = utdsl.save_tuners(tuned, tmp_path / "pos.safetensors")
    again = utdsl.compile("pos_embed -> weight lora(r=2, alpha=4)\ncls_token -> weight lora(r=1)", base, X)
    utdsl.load_tuners(again, path)
    assert torch.equal(again(X), got)


def test_a_relative_position_table_takes_a_weight_tuner():
    torch.manual_seed(0)
    base = timm.create_model("beit_base_patch16_224", img_size=32, depth=1, embed_dim=64, num_heads=2,
                             num_classes=3).eval()
    with torch.no_grad():   # timm starts the table at zero and the head at 1e-3: the test would see nothing
        torch.nn.init.normal_(base.head.weight)
        torch.nn.init.normal_(base.blocks[0].attn.relative_position_bias_table)
    x = torch.randn(1, 3, 32, 32)
    tuned = utdsl.compile("attn.relative_position_bias_table -> weight oft(block_size=2)", base, x)
    table = base.get_parameter("blocks.0.attn.relative_position_bias_table")   # (L, heads=2)
    assert utdsl.trainable_parameters(tuned) == 1   # one 2x2 block: one skew entry
    perturb(tuned)
    unit = tuned.get_submodule(tuned.meta["utdsl"].plan.insertions[0].module_name).units["full"]
    rotated = table @ unit.rotation()[0].T
    expected = functional_call(base, {"blocks.0.attn.relative_position_bias_table": rotated}, (x,))
    torch.testing.assert_close(tuned(x), expected, rtol=1e-5, atol=1e-5)
    assert (tuned(x) - base(x)).abs().max() > 1e-4   # 20x the tolerance above


def test_other_placements_on_a_parameter_and_chunks_of_one_are_errors_at_the_rule():
    with pytest.raises(SpecError) as caught:
        utdsl.compile("train @classifier\npos_embed -> parallel lowrank(r=2)", tiny_vit(), X)
    text = str(caught.value)
    assert text.startswith("<string>:2:1: error: selector 'pos_embed' matches no module of the model")
    assert "'pos_embed' is a parameter, not a module: `weight` is the placement that tunes one" in text
    with pytest.raises(SpecError, match=r"<string>:1:1: error: pos_embed: a raw parameter has no chunks"):
        utdsl.compile("pos_embed{0, 1 of 2} -> weight lora(r=2)", tiny_vit(), X)
    with pytest.raises(SpecError, match="matches no module or parameter.*\n.*\n.*\n  hint: closest real paths: pos_embed"):
        utdsl.compile("pos_embd -> weight lora(r=2)", tiny_vit(), X)
