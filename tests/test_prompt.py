"""The ``prompt`` placement and the ``tokens`` tuner: VPT-shallow and VPT-deep, exact parameter
counts, equality with VPT's own formulation, pooling and head seeing the original tokens, only
tuners training, stacking with other rules, and errors on sites that are not token sequences."""

from __future__ import annotations

import math

import pytest
import torch

import utdsl
from utdsl.plan import propagate_shapes
from utdsl.placements.prompt import drop_tokens
from utdsl.trace import region
from utdsl.verify import verify

from .conftest import meta_model, tiny_vit, trainable_without_head


@pytest.fixture(scope="module")
def vit_b16():
    return meta_model()


@pytest.mark.parametrize("length", [1, 10, 50])
def test_vpt_parameter_counts_on_vit_b16(vit_b16, length):
    shallow = utdsl.compile(f"^blocks -> prompt tokens(length={length})", vit_b16)
    deep = utdsl.compile(f"blocks.* -> prompt tokens(length={length})", vit_b16)
    assert trainable_without_head(shallow) == 768 * length
    assert trainable_without_head(deep) == 9_216 * length
    assert shallow.meta["utdsl"].plan.tuner_params == 768 * length


def test_library_vpt_specs_on_vit_b16(vit_b16):
    assert trainable_without_head(utdsl.compile("vpt_shallow", vit_b16)) == 38_400   # 768 x 50
    assert trainable_without_head(utdsl.compile("vpt_deep", vit_b16)) == 92_160      # 9,216 x 10


def prompts(tuned, site: str) -> torch.Tensor:
    return tuned.get_submodule(f"tuners.{site}.prompt_tokens").units["full"].tokens


def embed(base, images):
    x = base.patch_embed(images)
    return base.norm_pre(base.patch_drop(base._pos_embed(x)))


def join(x, p, start):
    return torch.cat([x[:, :start], p.expand(x.shape[0], -1, -1), x[:, start:]], dim=1)


@torch.no_grad()
def test_vpt_shallow_equals_prompts_around_the_block_stack(images):
    base = tiny_vit()
    tuned = utdsl.compile("^blocks -> prompt tokens(length=4)", base)
    p = prompts(tuned, "blocks")
    x = drop_tokens(base.blocks(join(embed(base, images), p, 1)), 1, 4)
    expected = base.forward_head(base.norm(x))
    torch.testing.assert_close(tuned(images), expected, rtol=0, atol=1e-6)
    assert (tuned(images) - base(images)).abs().max() > 1e-3   # prompts change the output


@torch.no_grad()
def test_vpt_deep_equals_vpts_own_formulation(images):
    """VPT keeps the prompts to the end, replacing them before every block, and reads the class
    token; dropping them at every block output is the same for everything downstream."""
    base = tiny_vit(depth=3)
    tuned = utdsl.compile("blocks.* -> prompt tokens(length=3, init=normal, std=0.5)", base)
    x = embed(base, images)
    for i, block in enumerate(base.blocks):
        p = prompts(tuned, f"blocks.{i}").expand(x.shape[0], -1, -1)
        x = block(torch.cat([x[:, :1], p, x[:, 1 + (3 if i else 0):]], dim=1))
    expected = base.head(base.norm(x)[:, 0])
    torch.testing.assert_close(tuned(images), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("options, start", [
    ({}, 1),                                                    # class token, cls pooling
    ({"global_pool": "avg"}, 1),                               # class token, average pooling
    ({"reg_tokens": 2}, 3),                                    # class + register tokens
    ({"class_token": False, "global_pool": "avg"}, 0),         # no prefix tokens at all
])
@torch.no_grad()
def test_pooling_and_head_see_exactly_the_original_tokens(options, start, images):
    base = tiny_vit(**options)
    tuned = utdsl.compile("blocks.* -> prompt tokens(length=2)", base)
    assert tuned.meta["utdsl"].plan.insertions[0].info.extras["num_prefix_tokens"] == start
    x = embed(base, images)
    for i, block in enumerate(base.blocks):
        x = drop_tokens(block(join(x, prompts(tuned, f"blocks.{i}"), start)), start, 2)
    torch.testing.assert_close(tuned(images), base.forward_head(base.norm(x)), rtol=0, atol=1e-6)
    propagate_shapes(tuned, images)
    (leaving,) = region(tuned.graph, "blocks").outputs        # what the norm and pooling read
    assert tuple(leaving.meta["tensor_meta"].shape) == (2, start + 4, 192)


def test_initialisation_follows_vpt():
    base = tiny_vit()
    uniform = prompts(utdsl.compile("^blocks -> prompt tokens(length=64)", base), "blocks")
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 192))                 # patch fan-in + width
    assert uniform.abs().max() <= bound and uniform.abs().max() > 0.9 * bound
    zeros = prompts(utdsl.compile("^blocks -> prompt tokens(length=4, init=zeros)", base), "blocks")
    assert not zeros.any()
    normal = prompts(utdsl.compile("^blocks -> prompt tokens(length=64, init=normal, std=0.5)", base), "blocks")
    assert 0.4 < normal.std() < 0.6


def test_prompts_are_not_identity_and_verify_skips_the_check(images):
    base = tiny_vit()
    tuned = utdsl.compile("vpt_deep", base)
    assert all(not i.identity_at_init for i in tuned.meta["utdsl"].plan.insertions)
    report = verify(base, tuned, images)
    assert not report.identity_expected and report.max_abs_diff > 0 and report.ok


def test_gradients_reach_only_tuners_and_the_head(images):
    tuned = utdsl.compile("vpt_deep", tiny_vit()).train()
    tuned(images).square().sum().backward()
    for name, p in tuned.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        assert p.requires_grad == (name.startswith(("tuners.", "head."))), name
    assert prompts(tuned, "blocks.0").grad.abs().sum() > 0


def randomize_tuners(tuned, seed=11):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(tuned.named_parameters()):
            if name.startswith("tuners."):
                p.normal_(0.0, 0.1)


@torch.no_grad()
def test_prompt_on_blocks_stacks_with_lowrank_on_qkv(vit_b16, images):
    spec = "^blocks -> prompt tokens(length=5)\nattn.qkv -> parallel lowrank(r=2)"
    assert trainable_without_head(utdsl.compile(spec, vit_b16)) == 768 * 5 + 12 * (768 * 2 + 2 * 2304)
    base = tiny_vit()
    first = utdsl.compile(spec, base)
    randomize_tuners(first)
    reordered = utdsl.compile("attn.qkv -> parallel lowrank(r=2)\n^blocks -> prompt tokens(length=5)", base)
    reordered.load_state_dict(first.state_dict())
    torch.testing.assert_close(first(images), reordered(images), rtol=0, atol=1e-6)
    prompt_only = utdsl.compile("^blocks -> prompt tokens(length=5)", base)
    prompt_only.load_state_dict(first.state_dict(), strict=False)
    assert (first(images) - prompt_only(images)).abs().max() > 1e-3   # the lowrank acts on prompted tokens


@torch.no_grad()
def test_prompt_and_parallel_adapter_on_the_same_site_in_either_order(images):
    base = tiny_vit()
    a = utdsl.compile("blocks.* -> prompt tokens(length=3)\nblocks.* -> parallel adapter(dim=4)", base)
    b = utdsl.compile("blocks.* -> parallel adapter(dim=4)\nblocks.* -> prompt tokens(length=3)", base)
    randomize_tuners(a)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(images), b(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rule, message", [
    ("patch_embed.proj -> prompt tokens", "needs a token sequence (batch, tokens, channels); this region's input is (2, 3, 32, 32)"),
    ("blocks.0.mlp.fc1 -> prompt tokens", "needs a region that keeps the width; it maps 192 to 768 channels"),
    ("blocks.0.attn.qkv{q} -> prompt tokens", "chunks do not apply"),
])
def test_sites_that_are_not_token_sequences_are_errors(rule, message):
    with pytest.raises(utdsl.SpecError) as error:
        utdsl.compile(rule, tiny_vit())
    assert message in str(error.value)
    assert error.value.diagnostics[0].span.line == 1
