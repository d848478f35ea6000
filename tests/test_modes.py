"""Train and eval graphs: fx bakes ``self.training`` branches (DropPath, sdpa's dropout_p) in at
trace time, so ``compile`` keeps one graph per mode and ``train()``/``eval()`` switch them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx

import utdsl
from utdsl.modes import ModalGraphModule

from .conftest import tiny_vit

DROPS = dict(drop_path_rate=0.1, attn_drop_rate=0.1, depth=3)


def run(model, images, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(images)


def test_dropout_models_get_two_graphs_others_one():
    dropping = utdsl.compile("lora", tiny_vit(**DROPS))
    plain = utdsl.compile("lora", tiny_vit())
    assert isinstance(dropping, ModalGraphModule) and isinstance(dropping, fx.GraphModule)
    assert dropping.has_mode_graphs and not plain.has_mode_graphs
    train_code = dropping.train().code
    eval_code = dropping.eval().code
    assert "bernoulli_" in train_code and "bernoulli_" not in eval_code
    assert "dropout_p = 0.1" in train_code and "dropout_p = 0.0" in eval_code


@pytest.mark.parametrize("spec", ["lora", "adapter", "utuning_parallel_block"])
def test_each_mode_behaves_as_the_base_model_does(spec, images):
    base = tiny_vit(**DROPS)
    tuned = utdsl.compile(spec, base)
    tuned.train(), base.train()
    first = run(tuned, images, 0)
    assert (first - run(tuned, images, 1)).abs().max() > 1e-3            # train mode is stochastic
    torch.testing.assert_close(first, run(base, images, 0), rtol=0, atol=1e-6)   # ... as the base's
    tuned.eval(), base.eval()
    torch.testing.assert_close(run(tuned, images, 0), run(tuned, images, 1), rtol=0, atol=0)
    torch.testing.assert_close(run(tuned, images, 0), run(base, images, 0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", ["vpt_deep", "prefix", "mam"])
def test_token_placements_in_both_modes(spec, images):
    tuned = utdsl.compile(spec, tiny_vit(**DROPS)).train()
    assert (run(tuned, images, 0) - run(tuned, images, 1)).abs().max() > 1e-3
    tuned.eval()
    torch.testing.assert_close(run(tuned, images, 0), run(tuned, images, 1), rtol=0, atol=0)


def test_the_result_starts_in_the_models_mode_and_shares_tuners_across_graphs():
    base = tiny_vit(**DROPS)
    assert not utdsl.compile("lora", base).training
    tuned = utdsl.compile("lora", base.train())
    assert tuned.training and all(m.training for m in tuned.modules())
    in_train = {n.target for n in tuned.graph.nodes if n.op == "call_module"}
    in_eval = {n.target for n in tuned.eval().graph.nodes if n.op == "call_module"}
    assert {t for t in in_train if t.startswith("tuners.")} == {t for t in in_eval if t.startswith("tuners.")}
    assert not any(m.training for m in tuned.modules())


def test_state_dict_meta_and_deep_copies(images):
    base = tiny_vit(**DROPS)
    tuned = utdsl.compile("lora", base)
    base_keys = list(base.state_dict())
    assert [k for k in tuned.state_dict() if not k.startswith("tuners.")] == base_keys
    clone = copy.deepcopy(tuned)
    assert isinstance(clone, ModalGraphModule) and clone.has_mode_graphs
    assert list(clone.state_dict()) == list(tuned.state_dict())
    assert clone.meta["utdsl"].plan.tuner_params == tuned.meta["utdsl"].plan.tuner_params
    with torch.no_grad():
        clone.get_parameter("tuners.blocks.0.attn.qkv.parallel_lowrank.units.q.up.weight").fill_(1.0)
    assert not tuned.get_parameter("tuners.blocks.0.attn.qkv.parallel_lowrank.units.q.up.weight").any()
    clone.train(), tuned.train()
    assert (run(clone, images, 0) - run(tuned, images, 0)).abs().max() > 1e-3   # the copy has its own tuners
    clone.eval()
    assert "bernoulli_" not in clone.code


def test_merge_removes_tuners_from_both_graphs(images):
    base = tiny_vit(**DROPS)
    tuned = utdsl.compile("lora", base)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.startswith("tuners."):
                p.normal_(0.0, 0.05)
    merged = utdsl.merge(tuned)
    for mode in (True, False):
        merged.train(mode), tuned.train(mode)
        assert not any(n.op == "call_module" and n.target.startswith("tuners.") for n in merged.graph.nodes)
        torch.testing.assert_close(run(merged, images, 0), run(tuned, images, 0), rtol=0, atol=1e-5)
