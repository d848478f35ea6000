"""Adapter+ (``specs/adapter_plus.ut``) and Hydra (``specs/hydra.ut``): exact counts on ViT-B/16,
the adapter's Adapter+ options, and equivalence with hand-written formulas of the papers."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import utdsl
from utdsl.tuners.adapter import Adapter, AdapterArgs
from utdsl.tuners.base import SiteInfo

from .conftest import meta_model, tiny_vit, trainable_without_head
from .reference import assert_equivalent, forward_hooks, randomize_tuners

COUNTS = {
    # 12 x (down 768x8 + 8, up 8x768 + 768, channel scale 768)
    "adapter_plus": 165_984,
    # 12 x (fc2: parallel 3,072x2 + 2 + 2x768 + 768, sequential 768x2 + 2 + 2x768 + 768;
    #       attn.proj: 2 x (768x2 + 2 + 2x768 + 768)); the paper's VTAB table says 0.28 M with the
    # average classifier head (VTAB-1k: about 36 K)
    "hydra": 239_712,
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_trainable_parameters_on_vit_b16(name):
    assert trainable_without_head(utdsl.compile(name, meta_model())) == COUNTS[name]


def _unit(tuned, site: str, joint: str):
    return tuned.get_submodule(f"{tuned.meta['utdsl'].plan_namespace}.{site}.{joint}").units["full"]


def test_adapter_plus_equals_the_post_adapter_formula():
    base = tiny_vit()
    tuned = utdsl.compile("adapter_plus", base)
    plan = tuned.meta["utdsl"].plan
    assert [i.site for i in plan.insertions] == ["blocks.0", "blocks.1"]
    assert not any(i.identity_at_init for i in plan.insertions)      # Houlsby init: near zero, not zero
    params = randomize_tuners(tuned)
    units = [_unit(tuned, f"blocks.{i}", "sequential_adapter") for i in range(2)]
    assert units[0].scale.shape == (192,) and isinstance(units[0].drop_path, torch.nn.Module)

    def post_adapter(unit):
        # Adapter+ "post": x = block(x); x = x + s * (W_u gelu(W_d x + b_d) + b_u)  (drop path off in eval)
        def hook(module, inputs, h):
            return h + unit.scale * F.linear(F.gelu(F.linear(h, unit.down.weight, unit.down.bias)),
                                             unit.up.weight, unit.up.bias)
        return hook

    def reference(x):
        with forward_hooks([(block, post_adapter(unit)) for block, unit in zip(base.blocks, units)]):
            return base(x)

    torch.manual_seed(0)
    assert_equivalent(tuned, reference, torch.randn(2, 3, 32, 32), params)


def test_adapter_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    unit = Adapter.build(AdapterArgs(dim=4, scale="channel", init="houlsby", drop_path=0.5), SiteInfo("s", 6, 6))
    x = torch.randn(64, 5, 6)
    unit.eval()
    full = unit(x)
    unit.train()
    dropped = unit(x)
    kept = [bool((dropped[i] != 0).any()) for i in range(64)]
    assert 10 < sum(kept) < 54
    for i in range(64):   # each sample dropped whole, or kept and scaled by 1 / (1 - p)
        expected = 2 * full[i] if kept[i] else torch.zeros_like(full[i])
        assert torch.allclose(dropped[i], expected, atol=1e-6)


def test_houlsby_init_is_truncated_at_two_standard_deviations():
    torch.manual_seed(0)
    unit = Adapter.build(AdapterArgs(dim=64, init="houlsby"), SiteInfo("s", 768, 768))
    for weight in (unit.down.weight, unit.up.weight):
        assert weight.abs().max() <= 0.02 and 0.007 < weight.std() < 0.01
    assert not Adapter.identity_at_init(AdapterArgs(init="houlsby"))
    assert Adapter.identity_at_init(AdapterArgs(init="xavier"))


def test_hydra_equals_parallel_plus_sequential_low_rank_on_each_linear():
    base = tiny_vit()
    tuned = utdsl.compile("hydra", base)
    sites = [i.site for i in tuned.meta["utdsl"].plan.insertions]
    assert sites == ["blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.attn.proj", "blocks.1.mlp.fc2"] * 2
    report = utdsl.verify(base, tuned, torch.randn(2, 3, 32, 32))
    assert report.identity_expected and report.max_abs_diff == 0.0, report.lines()
    params = randomize_tuners(tuned)
    pairs = []
    for i, block in enumerate(base.blocks):
        for path, linear in (("attn.proj", block.attn.proj), ("mlp.fc2", block.mlp.fc2)):
            seq = _unit(tuned, f"blocks.{i}.{path}", "sequential_adapter")
            par = _unit(tuned, f"blocks.{i}.{path}", "parallel_adapter")

            def hook(module, inputs, h, seq=seq, par=par):
                # Hydra: y = W x + b + s (P_u (P_d x + p_d) + p_u) + s (S_u (S_d (W x + b) + s_d) + s_u)
                (x,) = inputs
                branch = lambda u, v: F.linear(F.linear(v, u.down.weight, u.down.bias), u.up.weight, u.up.bias)
                return h + 0.1 * branch(par, x) + 0.1 * branch(seq, h)
            pairs.append((linear, hook))

    def reference(x):
        with forward_hooks(pairs):
            return base(x)

    assert_equivalent(tuned, reference, torch.randn(2, 3, 32, 32), params)


def test_hydra_without_dropout_merges_its_sequential_branches():
    base = tiny_vit()
    tuned = utdsl.compile("hydra", base, overrides={"dropout": "0"})
    randomize_tuners(tuned)
    merged = utdsl.merge(tuned)
    x = torch.randn(2, 3, 32, 32)
    tuned.eval(), merged.eval()
    left = {name.split(".units")[0] for name, _ in merged.named_parameters() if name.startswith("tuners.")}
    # the sequential branches fold into W; merge does not yet fold a parallel tuner stacked on a joint
    assert left == {f"tuners.blocks.{i}.{p}.parallel_adapter" for i in (0, 1) for p in ("attn.proj", "mlp.fc2")}
    assert torch.allclose(merged(x), tuned(x), atol=1e-5)
