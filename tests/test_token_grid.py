"""Token-grid tuners (``conv_adapter``: Convpass; ``mona``): the grid each site gets, exact counts
on ViT-B/16, and equivalence with hand-written formulas on ViT, DeiT (distillation token), Swin
(NHWC maps and token sequences without prefix) and ConvNeXt (NCHW and NHWC maps)."""

from __future__ import annotations


import pytest
import timm
import torch
import torch.nn.functional as F

import utdsl

from .conftest import meta_model, tiny_vit, trainable_without_head
from .reference import assert_equivalent, forward_hooks, randomize_tuners

COUNTS = {
    # 24 x (down 768x8 + 8, conv 8x8x3x3 + 8, up 8x768 + 768): the paper's 0.33 M
    "convpass": 327_552,
    # 24 x (norm 2x768, gamma 768, gamma_x 768, down 768x64 + 64, depthwise 64 x (9 + 25 + 49) + 3 x 64,
    #       proj 64x64 + 64, up 64x768 + 768)
    "mona": 2_684_928,
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_trainable_parameters_on_vit_b16(name):
    tuned = utdsl.compile(name, meta_model())
    assert trainable_without_head(tuned) == COUNTS[name]
    assert {(i.info.extras["grid"], i.info.extras["prefix_tokens"]) for i in tuned.meta["utdsl"].plan.insertions} \
        == {((14, 14), 1)}


def qgelu(x):
    return x * torch.sigmoid(1.702 * x)


def convpass_ref(unit, x, grid, prefix, scale=1.0):
    """Convpass's bypass as its code writes it: the cls (here: every prefix) token through the 3x3
    conv as a 1x1 map, the patches on their grid."""
    b, n, _ = x.shape
    d = qgelu(F.linear(x, unit.down.weight, unit.down.bias))
    dim = d.shape[-1]
    patches = d[:, prefix:].reshape(b, *grid, dim).permute(0, 3, 1, 2)
    patches = F.conv2d(patches, unit.conv.weight, unit.conv.bias, padding=1).permute(0, 2, 3, 1).reshape(b, -1, dim)
    heads = [F.conv2d(d[:, i].reshape(b, dim, 1, 1), unit.conv.weight, unit.conv.bias, padding=1).reshape(b, 1, dim)
             for i in range(prefix)]
    d = qgelu(torch.cat([*heads, patches], dim=1))
    return F.linear(d, unit.up.weight, unit.up.bias) * scale


def mona_ref(unit, x, grid, prefix):
    """Mona's adapter (its code's Mona and MonaOp), prefix tokens around the grid operation."""
    c = x.shape[-1]
    z = F.layer_norm(x, (c,), unit.norm.weight, unit.norm.bias) * unit.gamma + x * unit.gamma_x
    z = F.linear(z, unit.down.weight, unit.down.bias)
    dim = z.shape[-1]
    maps = z.permute(0, 3, 1, 2) if z.dim() == 4 else z[:, prefix:].reshape(z.shape[0], *grid, dim).permute(0, 3, 1, 2)
    convs = unit.grid_op.convs
    mixed = sum(F.conv2d(maps, conv.weight, conv.bias, padding=k // 2, groups=dim) for conv, k in zip(convs, (3, 5, 7)))
    m = maps + mixed / 3.0
    m = m + F.conv2d(m, unit.grid_op.proj.weight, unit.grid_op.proj.bias)
    m = m.permute(0, 2, 3, 1)
    if z.dim() == 3:
        m = torch.cat([z[:, :prefix], m.reshape(z.shape[0], -1, dim)], dim=1)
    return F.linear(F.gelu(m), unit.up.weight, unit.up.bias)


def _unit(tuned, name):
    return tuned.get_submodule(f"{tuned.meta['utdsl'].plan_namespace}.{name}").units["full"]


def _parallel(unit, formula):
    return lambda module, inputs, out: out + formula(unit, inputs[0])


def _sequential(unit, formula):
    return lambda module, inputs, out: out + formula(unit, out)


@pytest.mark.parametrize("model, prefix", [("vit", 1), ("deit_distilled", 2), ("vit_registers", 5)])
def test_convpass_equals_its_code_on_vit_deit_and_registers(model, prefix):
    if model == "vit":
        base = tiny_vit(img_size=48)
    elif model == "deit_distilled":
        torch.manual_seed(0)
        base = timm.create_model("deit_tiny_distilled_patch16_224", img_size=48, depth=2, num_classes=10).eval()
    else:
        base = tiny_vit(img_size=48, reg_tokens=4)
    assert base.num_prefix_tokens == prefix
    x = torch.randn(2, 3, 48, 48)
    tuned = utdsl.compile("convpass", base, x)
    insertion = tuned.meta["utdsl"].plan.insertions[0]
    assert (insertion.info.extras["grid"], insertion.info.extras["prefix_tokens"]) == ((3, 3), prefix)
    report = utdsl.verify(base, tuned, x)
    assert report.identity_expected and report.max_abs_diff == 0.0, report.lines()
    params = randomize_tuners(tuned)
    pairs = []
    for i, block in enumerate(base.blocks):
        for part in ("attn", "mlp"):
            unit = _unit(tuned, f"blocks.{i}.{part}.parallel_conv_adapter")
            pairs.append((getattr(block, part), _parallel(unit, lambda u, v: convpass_ref(u, v, (3, 3), prefix))))

    def reference(v):
        with forward_hooks(pairs):
            return base(v)

    assert_equivalent(tuned, reference, x, params)


def test_mona_equals_its_code_on_vit():
    base = tiny_vit(img_size=48)
    x = torch.randn(2, 3, 48, 48)
    tuned = utdsl.compile("mona", base, x)
    params = randomize_tuners(tuned)
    first = [_unit(tuned, f"blocks.{i}.span_norm1_upto_norm2.sequential_mona") for i in range(2)]
    second = [_unit(tuned, f"blocks.{i}.sequential_mona") for i in range(2)]

    def reference(v):
        v = base.norm_pre(base._pos_embed(base.patch_embed(v)))
        for block, one, two in zip(base.blocks, first, second):
            v = v + block.attn(block.norm1(v))
            v = v + mona_ref(one, v, (3, 3), 1)
            v = v + block.mlp(block.norm2(v))
            v = v + mona_ref(two, v, (3, 3), 1)
        return base.forward_head(base.norm(v))

    assert_equivalent(tuned, reference, x, params)


def _swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=56, depths=(2, 2), num_heads=(2, 4),
                             embed_dim=16, num_classes=5).eval()


def test_mona_on_swin_reads_token_sequences_and_nhwc_maps():
    base = _swin()
    x = torch.randn(2, 3, 56, 56)
    tuned = utdsl.compile("mona", base, x)
    grids = {i.site: i.info.extras["grid"] for i in tuned.meta["utdsl"].plan.insertions}
    assert grids["layers.0.blocks.1(norm1..<norm2)"] == (14, 14) and grids["layers.1.blocks.0(norm1..<norm2)"] == (7, 7)
    assert grids["layers.1.blocks.1"] is None      # the block gives an NHWC map: the native grid
    params = randomize_tuners(tuned)
    originals = {}

    def patched(block, path):
        one = _unit(tuned, f"{path}.span_norm1_upto_norm2.sequential_mona")
        two = _unit(tuned, f"{path}.sequential_mona")

        def forward(v):        # timm's SwinTransformerBlock.forward with Mona after each residual add
            b, h, w, c = v.shape
            v = v + block.drop_path1(block._attn(block.norm1(v)))
            v = v.reshape(b, -1, c)
            v = v + mona_ref(one, v, (h, w), 0)
            v = v + block.drop_path2(block.mlp(block.norm2(v)))
            v = v.reshape(b, h, w, c)
            return v + mona_ref(two, v, None, 0)
        return forward

    blocks = {f"layers.{s}.blocks.{i}": base.layers[s].blocks[i] for s in range(2) for i in range(2)}

    def reference(v):
        for path, block in blocks.items():
            originals[path] = block.forward
            block.forward = patched(block, path)
        try:
            return base(v)
        finally:
            for path, block in blocks.items():
                block.forward = originals[path]

    assert_equivalent(tuned, reference, x, params)


def test_convpass_on_swin_mlp_tokens_without_prefix():
    base = _swin()
    x = torch.randn(2, 3, 56, 56)
    tuned = utdsl.compile("blocks.*.mlp -> parallel conv_adapter(dim=4, scale=2.0)", base, x)
    params = randomize_tuners(tuned)
    pairs = []
    for s, side in ((0, 14), (1, 7)):
        for i in range(2):
            unit = _unit(tuned, f"layers.{s}.blocks.{i}.mlp.parallel_conv_adapter")
            pairs.append((base.layers[s].blocks[i].mlp,
                          _parallel(unit, lambda u, v, side=side: convpass_ref(u, v, (side, side), 0, 2.0))))

    def reference(v):
        with forward_hooks(pairs):
            return base(v)

    assert_equivalent(tuned, reference, x, params)


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_token_grid_tuners_on_convnext_maps(conv_mlp):
    torch.manual_seed(0)
    base = timm.create_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5,
                             conv_mlp=conv_mlp).eval()
    x = torch.randn(2, 3, 64, 64)
    spec = "blocks.* -> sequential mona(dim=8)\nblocks.*.mlp -> parallel conv_adapter(dim=4)"
    tuned = utdsl.compile(spec, base, x)
    plan = tuned.meta["utdsl"].plan
    assert {i.info.extras["grid"] for i in plan.insertions} == {None}
    assert {(i.site, i.in_axis) for i in plan.insertions if i.tuner == "mona"} == {
        (f"stages.{s}.blocks.0", 1) for s in range(4)}
    params = randomize_tuners(tuned)
    pairs = []
    for s in range(4):
        block = base.stages[s].blocks[0]
        mona = _unit(tuned, f"stages.{s}.blocks.0.sequential_mona")
        conv = _unit(tuned, f"stages.{s}.blocks.0.mlp.parallel_conv_adapter")
        # NCHW block output: the tuner reads channels last
        pairs.append((block, lambda m, i, out, u=mona: out + mona_ref(u, out.permute(0, 2, 3, 1), None, 0).permute(0, 3, 1, 2)))

        def conv_hook(module, inputs, out, u=conv):
            v = inputs[0]
            nchw = v.dim() == 4 and conv_mlp
            v = v.permute(0, 2, 3, 1) if nchw else v
            d = qgelu(F.linear(v, u.down.weight, u.down.bias)).permute(0, 3, 1, 2)
            d = qgelu(F.conv2d(d, u.conv.weight, u.conv.bias, padding=1)).permute(0, 2, 3, 1)
            delta = F.linear(d, u.up.weight, u.up.bias)
            return out + (delta.permute(0, 3, 1, 2) if nchw else delta)
        pairs.append((block.mlp, conv_hook))

    def reference(v):
        with forward_hooks(pairs):
            return base(v)

    assert_equivalent(tuned, reference, x, params)


def test_a_token_grid_tuner_refuses_chunks_and_non_token_values():
    with pytest.raises(utdsl.SpecError, match="a token-grid tuner tunes every channel; this rule names chunks"):
        utdsl.compile("attn.qkv{q, v} -> parallel conv_adapter", tiny_vit())
    with pytest.raises(utdsl.SpecError, match="the kernel size must be odd"):
        utdsl.compile("blocks.*.mlp -> parallel conv_adapter(kernel=4)", tiny_vit())
