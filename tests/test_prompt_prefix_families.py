"""``prompt`` and ``prefix`` on attentions with relative-position biases, rotary embeddings, reduced
keys and windows (timm BEiT, EVA-02, RoPE ViT, PVT-v2, LeViT, Swin): equal, forward and gradients,
to hand-written references where the method is defined; a SpecError at the rule naming the reason
where it is not. Tiny configs (one or two blocks, 32-64 pixels)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import utdsl
from utdsl.placements.prompt import drop_tokens, pad_tokens

FAMILIES = {
    "beit": ("beit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, embed_dim=32, num_heads=2), 28),
    "vit_rope": ("vit_small_patch16_rope_224", dict(img_size=32, depth=1, embed_dim=32, num_heads=2), 32),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 32, 32), num_heads=(1, 1, 2, 2)), 64),
    "levit": ("levit_128s", dict(img_size=64, depth=(1, 1, 1), embed_dim=(32, 48, 64), num_heads=(2, 2, 2),
                                 key_dim=8), 64),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=4, depths=(2, 1), num_heads=(1, 2),
                                                  embed_dim=16), 32),
}


def family(name: str, **options):
    """(model with random weights, images); random so that biases and residual branches matter."""
    model_name, kwargs, size = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=5, **kwargs, **options).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model, torch.randn(2, 3, size, size)


def tuner_params(tuned):
    return [p for n, p in sorted(tuned.named_parameters()) if n.startswith("tuners.")]


def forward_and_grads(run, params):
    for p in params:
        p.grad = None
    out = run()
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


def assert_same(tuned, images, reference):
    params = tuner_params(tuned)
    out, grads = forward_and_grads(lambda: tuned(images), params)
    expected, expected_grads = forward_and_grads(reference, params)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads)


def prompted(base, tuned, sites, start, length):
    """Hooks that join each site's prompts after ``start`` tokens and drop them at its output."""
    handles = []
    for site in sites:
        p = tuned.get_submodule(f"tuners.{site}.prompt_tokens").units["full"].tokens

        def join(module, args, p=p):
            x = args[0]
            return (torch.cat([x[:, :start], p.expand(x.shape[0], -1, -1), x[:, start:]], dim=1), *args[1:])

        block = base.get_submodule(site)
        handles += [block.register_forward_pre_hook(join),
                    block.register_forward_hook(lambda m, a, y: drop_tokens(y, start, length))]
    return handles


# -- prompt ---------------------------------------------------------------------------------------

def test_beit_prompts_get_zero_relative_position_bias():
    base, images = family("beit")
    tuned = utdsl.compile("blocks.* -> prompt tokens(length=3)", base, images)
    for block in base.blocks:                 # the reference: BEiT's bias with zero rows/columns
        own = block.attn._get_rel_pos_bias
        block.attn._get_rel_pos_bias = lambda own=own: pad_tokens(own(), 1, 3, (-2, -1))
    prompted(base, tuned, ["blocks.0", "blocks.1"], 1, 3)
    assert_same(tuned, images, lambda: base(images))


def test_pad_tokens_inserts_zero_rows_and_columns_after_the_prefix_tokens():
    bias = torch.arange(1.0, 10.0).reshape(1, 3, 3)
    padded = pad_tokens(bias, 1, 2, (-2, -1))
    assert padded.shape == (1, 5, 5)
    assert padded[0, 1:3].abs().sum() == 0 and padded[0, :, 1:3].abs().sum() == 0
    torch.testing.assert_close(padded[0][[0, 3, 4]][:, [0, 3, 4]], bias[0])
    mask = pad_tokens(torch.zeros(2, 2, dtype=torch.bool), 0, 1, (-1,))
    assert mask[:, 0].all() and not mask[:, 1:].any()


@pytest.mark.parametrize("name", ["eva02", "vit_rope"])
def test_rotary_models_treat_prompts_as_unrotated_prefix_tokens(name):
    base, images = family(name)
    depth = len(base.blocks)
    tuned = utdsl.compile("blocks.* -> prompt tokens(length=2)", base, images)
    start = base.num_prefix_tokens
    assert start >= 1
    for block in base.blocks:                 # rope skips the class token and the prompts
        block.attn.num_prefix_tokens = start + 2
    prompted(base, tuned, [f"blocks.{i}" for i in range(depth)], start, 2)
    assert_same(tuned, images, lambda: base(images))


def test_levit_blocks_take_prompts_with_zero_attention_bias():
    """LeViT's blocks keep tokens a sequence (only its downsampling stages make a grid); its
    attention biases are padded like BEiT's. No prefix tokens: prompts come first."""
    base, images = family("levit")
    tuned = utdsl.compile("stages.0.blocks.0 -> prompt tokens(length=2)", base, images)
    attn = base.stages[0].blocks[0].attn
    own = attn.get_attention_biases
    attn.get_attention_biases = lambda device: pad_tokens(own(device), 0, 2, (-2, -1))
    prompted(base, tuned, ["stages.0.blocks.0"], 0, 2)
    assert_same(tuned, images, lambda: base(images))


@pytest.mark.parametrize("name, rule, message", [
    ("pvt_v2", "stages.*.blocks.* -> prompt tokens(length=2)",
     "the tokens are reshaped to a fixed size (a spatial grid) inside this region"),
    ("swin", "layers.*.blocks.* -> prompt tokens(length=2)",
     "needs a token sequence (batch, tokens, channels); this region's input is (2, 8, 8, 16)"),
])
def test_prompts_on_spatial_token_grids_are_refused(name, rule, message):
    base, images = family(name)
    with pytest.raises(utdsl.SpecError) as error:
        utdsl.compile(f"head -> sequential affine\n  {rule}", base, images)
    diagnostic = error.value.diagnostics[0]      # one a site; every site of the rule fails
    assert message in diagnostic.message
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 3)


# -- prefix ---------------------------------------------------------------------------------------

def sdpa_with_prefix(monkeypatch, base, tuned, sites):
    """Patch sdpa so that the base model's attentions at ``sites`` read the tuned model's prefix
    keys and values, with zero bias and visible to every query."""
    own = F.scaled_dot_product_attention
    current = []
    for site in sites:
        joint = tuned.get_submodule(f"tuners.{site}.prefix_kv")
        attn = base.get_submodule(site)
        attn.register_forward_pre_hook(lambda m, a, joint=joint: current.append(joint))
        attn.register_forward_hook(lambda m, a, y: (current.pop(), None)[1])

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        if not current:
            return own(q, k, v, attn_mask=attn_mask, scale=scale)
        pk, pv = current[-1].heads(q.shape[0])
        if attn_mask is not None:
            attn_mask = attn_mask.expand(*q.shape[:-1], k.shape[-2])
            attn_mask = torch.cat([attn_mask.new_zeros(*attn_mask.shape[:-1], pk.shape[-2]), attn_mask], -1)
        return own(q, torch.cat([pk, k], -2), torch.cat([pv, v], -2), attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)


def use_sdpa(model):
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model


@pytest.mark.parametrize("name, sites", [
    ("beit", ["blocks.0.attn", "blocks.1.attn"]),                      # relative-position bias
    ("eva02", ["blocks.0.attn", "blocks.1.attn"]),                     # rope: prefix keys not rotated
    ("vit_rope", ["blocks.0.attn"]),
    ("pvt_v2", ["stages.0.blocks.0.attn", "stages.1.blocks.0.attn"]),   # keys from a reduced map
    ("swin", ["layers.0.blocks.0.attn", "layers.0.blocks.1.attn"]),     # window bias + shifted mask
])
def test_prefix_keys_get_zero_bias_and_no_rotation(monkeypatch, name, sites):
    base, images = family(name)
    spec = "\n".join(f"{site} -> prefix kv(length=3)" for site in sites)
    tuned = utdsl.compile(spec, base, images)          # Swin traces its manual attention
    for p in tuner_params(tuned):
        torch.nn.init.normal_(p, 0.0, 0.5)
    sdpa_with_prefix(monkeypatch, base, tuned, sites)
    assert_same(tuned, images, lambda: use_sdpa(base)(images))


def test_swin_shifted_window_mask_is_padded():
    base, images = family("swin")
    tuned = utdsl.compile("layers.0.blocks.1.attn -> prefix kv(length=2)", base, images)
    assert "last_size" in tuned.code and "prefix_mask" in tuned.code


def test_levit_prefix_is_refused_for_keys_narrower_than_values():
    base, images = family("levit")
    with pytest.raises(utdsl.SpecError) as error:
        utdsl.compile("stages.*.blocks.*.attn -> prefix kv(length=2)", base, images)
    diagnostic = error.value.diagnostics[0]
    assert "keys have 8 channels a head and its values 16" in diagnostic.message
    assert (diagnostic.span.line, diagnostic.span.column) == (1, 1)
