"""The ``prefix`` placement and the ``kv`` tuner: exact parameter counts, equality with the gated
parallel form (1 - l) Attn(Q, K, V) + l Attn(Q, Pk, Pv) on timm's fused and non-fused attention,
masks and causal attention, only tuners training, and errors on regions without one attention."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import utdsl
from utdsl.placements.base import FULL
from utdsl.placements.prefix import PrefixJoint, prefix_mask
from utdsl.tuners.kv import KV, KVArgs
from utdsl.verify import verify

from .conftest import meta_model, tiny_vit, trainable_without_head


@pytest.fixture(scope="module")
def vit_b16():
    return meta_model()


@pytest.mark.parametrize("spec, expected", [
    ("blocks.*.attn -> prefix kv(length=10)", 184_320),                    # 12 x 2 x 10 x 768
    ("blocks.*.attn -> prefix kv(length=1)", 18_432),
    ("blocks.* -> prefix kv(length=10)", 184_320),                         # a block holds one attention
    # reparam: E (10 x 768) + Linear(768, 512) + Linear(512, 1536), per attention
    ("blocks.*.attn -> prefix kv(length=10, reparam=true)", 12 * (7_680 + 393_728 + 787_968)),
    ("prefix", 184_320),
    ("mam", 552_960 + 12 * (768 * 512 + 512 + 512 * 768 + 768)),          # 10,005,504
    ("utuning_prefix_adapter", 184_320 + 304_320),
])
def test_parameter_counts_on_vit_b16(vit_b16, spec, expected):
    tuned = utdsl.compile(spec, vit_b16)
    assert trainable_without_head(tuned) == expected
    assert tuned.meta["utdsl"].plan.tuner_params == expected


def manual_attention(model):
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def gated_forward(attn, keys, values):
    """timm's Attention.forward written as (1 - l) Attn(Q, K, V) + l Attn(Q, Pk, Pv)."""
    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        pk, pv = (t.reshape(-1, H, D).transpose(0, 1) for t in (keys, values))   # (H, L, D)
        own = (q @ k.transpose(-2, -1)) * self.scale
        prefix = (q @ pk.transpose(-2, -1)) * self.scale
        gate = torch.sigmoid(prefix.logsumexp(-1, keepdim=True) - own.logsumexp(-1, keepdim=True))
        out = (1 - gate) * (own.softmax(-1) @ v) + gate * (prefix.softmax(-1) @ pv)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    return types.MethodType(forward, attn)


def randomize_tuners(tuned, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(tuned.named_parameters()):
            if name.startswith("tuners."):
                p.normal_(0.0, 0.5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("reparam", [False, True])
@torch.no_grad()
def test_prefix_equals_the_gated_parallel_form(fused, reparam, images):
    base = tiny_vit() if fused else manual_attention(tiny_vit())
    tuned = utdsl.compile(f"blocks.*.attn -> prefix kv(length=5, reparam={str(reparam).lower()}, hidden=8)", base)
    kinds = {i.info.extras["attention"] for i in tuned.meta["utdsl"].plan.insertions}
    assert kinds == {"fused" if fused else "manual"}
    randomize_tuners(tuned)
    for i, block in enumerate(base.blocks):
        keys, values = tuned.get_submodule(f"tuners.blocks.{i}.attn.prefix_kv").units[FULL]()
        block.attn.forward = gated_forward(block.attn, keys, values)
    torch.testing.assert_close(tuned(images), base(images), rtol=0, atol=1e-5)


@torch.no_grad()
def test_fused_and_non_fused_attention_give_the_same_prefixed_model(images):
    fused = utdsl.compile("prefix", tiny_vit())
    manual = utdsl.compile("prefix", manual_attention(tiny_vit()))
    randomize_tuners(fused)
    manual.load_state_dict(fused.state_dict())
    torch.testing.assert_close(manual(images), fused(images), rtol=0, atol=1e-5)


def reference(q, k, v, pk, pv, allowed=None):
    """softmax over [prefix; keys] with ``allowed`` (queries x keys, bool) on the keys only."""
    scores = torch.cat([q @ pk.transpose(-2, -1), q @ k.transpose(-2, -1)], dim=-1) * q.shape[-1] ** -0.5
    if allowed is not None:
        scores[..., pk.shape[-2]:] = scores[..., pk.shape[-2]:].masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ torch.cat([pv, v], dim=-2)


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
@torch.no_grad()
def test_masks_extend_over_the_prefix(kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4) for _ in range(3))
    unit = KV(12, KVArgs(length=2, std=1.0))
    joint = PrefixJoint({FULL: unit}, num_heads=3, head_dim=4)
    allowed = torch.rand(2, 1, 6, 6) > 0.3
    allowed[..., 0] = True
    if kind == "causal":
        allowed = torch.ones(6, 6, dtype=torch.bool).tril()
        mask = prefix_mask(None, 2, True, True, q, k)
    else:
        given = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        mask = prefix_mask(given, 2)
    got = F.scaled_dot_product_attention(q, joint(k, "keys"), joint(v, "values"), attn_mask=mask)
    pk, pv = joint.heads(2)
    torch.testing.assert_close(got, reference(q, k, v, pk, pv, allowed), rtol=0, atol=1e-5)
    assert prefix_mask(None, 2) is None and prefix_mask(torch.zeros(6, 1), 2).shape == (6, 1)


class ToyAttention(nn.Module):
    """Causal fused attention, or manual attention with a learned bias over the keys."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(8, 24)
        self.bias = nn.Parameter(torch.randn(2, 5, 5))

    def split(self, x):
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x):
        q, k, v = self.split(x)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = ((q @ k.transpose(-2, -1)) * 0.5 + self.bias).softmax(dim=-1) @ v
        return out.transpose(1, 2).flatten(2)


class Toy(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.attn = ToyAttention(fused)

    def forward(self, x):
        return self.attn(x)


@pytest.mark.parametrize("fused", [True, False])
@torch.no_grad()
def test_causal_attention_and_biases_see_the_whole_prefix(fused):
    torch.manual_seed(0)
    base, x = Toy(fused), torch.randn(2, 5, 8)
    tuned = utdsl.compile("attn -> prefix kv(length=3, std=1.0)", base, x)
    joint = tuned.get_submodule("tuners.attn.prefix_kv")
    q, k, v = base.attn.split(x)
    pk, pv = joint.heads(2)
    if fused:
        expected = reference(q, k, v, pk, pv, torch.ones(5, 5, dtype=torch.bool).tril())
    else:
        scores = torch.cat([q @ pk.transpose(-2, -1), q @ k.transpose(-2, -1) + 2 * base.attn.bias], -1) * 0.5
        expected = scores.softmax(-1) @ torch.cat([pv, v], dim=-2)
    torch.testing.assert_close(tuned(x), expected.transpose(1, 2).flatten(2), rtol=0, atol=1e-5)


def test_prefix_is_not_identity_and_verify_skips_the_check(images):
    base = tiny_vit()
    tuned = utdsl.compile("blocks.*.attn -> prefix kv(length=4, std=0.0)", base)   # zero keys and values
    report = verify(base, tuned, images)
    assert not report.identity_expected and report.max_abs_diff > 1e-4 and report.ok


def test_gradients_reach_only_tuners_and_the_head(images):
    tuned = utdsl.compile("mam", tiny_vit()).train()
    tuned(images).square().sum().backward()
    for name, p in tuned.named_parameters():
        assert (p.grad is not None) == p.requires_grad == name.startswith(("tuners.", "head.")), name
    unit = tuned.get_submodule("tuners.blocks.1.attn.prefix_kv").units[FULL]
    assert unit.keys.grad.abs().sum() > 0 and unit.values.grad.abs().sum() > 0


@pytest.mark.parametrize("rule, message", [
    ("^blocks -> prefix kv", "this region holds 2 attentions; prefix joins the keys of one"),
    ("blocks.*.mlp -> prefix kv", "prefix needs an attention inside the region"),
    ("attn.qkv{k} -> prefix kv", "chunks do not apply"),
])
def test_regions_without_exactly_one_attention_are_errors(rule, message):
    with pytest.raises(utdsl.SpecError) as error:
        utdsl.compile(rule, tiny_vit())
    assert message in str(error.value)
