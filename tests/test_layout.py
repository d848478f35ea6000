"""Channel layout of sites (NCHW maps, NHWC maps, tokens) and sites that change shape: conv-shaped
lowrank on convs (peft's LoRA Conv2d formula), exact merge, and compile-time errors for parallel
tuners that cannot map a site's input shape to its output shape."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import utdsl
from utdsl.verify import verify


def axes(tuned) -> dict[str, tuple[int, int, int, int]]:
    """site -> (in_axis, out_axis, out_features, params)."""
    return {i.site: (i.in_axis, i.out_axis, i.info.out_features, i.params)
            for i in tuned.meta["utdsl"].plan.insertions}


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10).eval()


RESNET_SPEC = "layer1.* | layer2.* -> sequential adapter(dim=8)"


@pytest.mark.parametrize("size", [(64, 96), (96, 64), (64, 64), (256, 256)])
def test_resnet_blocks_are_channels_first_at_any_size(size):
    # 256x256: layer1's maps are 64x64x64 (H == W == C); 64x96: not square
    tuned = utdsl.compile(RESNET_SPEC, resnet18(), torch.randn(1, 3, *size))
    found = axes(tuned)
    assert tuned.meta["utdsl"].plan.tuner_params == 6_560  # 2 x 1,096 (64 ch) + 2 x 2,184 (128 ch)
    assert {site: a[:3] for site, a in found.items()} == {
        "layer1.0": (1, 1, 64), "layer1.1": (1, 1, 64), "layer2.0": (1, 1, 128), "layer2.1": (1, 1, 128)}


def test_resnet_compiled_at_one_size_runs_at_another():
    base = resnet18()
    tuned = utdsl.compile(RESNET_SPEC + "\nlayer2.0.downsample.0 -> parallel lowrank(r=2)", base,
                          torch.randn(1, 3, 64, 96))
    x = torch.randn(2, 3, 80, 48)
    torch.testing.assert_close(tuned(x), base(x), rtol=0, atol=0)


def test_dynamic_vit_compiled_at_one_size_runs_at_another():
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3,
                             dynamic_img_size=True).eval()
    tuned = utdsl.compile("blocks.* -> sequential adapter(dim=4)\nattn.qkv{q, v} -> parallel lowrank(r=2)\n"
                          "patch_embed.proj -> parallel lowrank(r=2)", base, torch.randn(1, 3, 32, 32))
    found = axes(tuned)
    assert found["blocks.0"] == (-1, -1, 192, 192 * 4 + 4 + 4 * 192 + 192)
    assert found["patch_embed.proj"] == (1, 1, 192, 3 * 2 * 16 * 16 + 2 * 192)  # conv-shaped
    x = torch.randn(2, 3, 48, 64)
    torch.testing.assert_close(tuned(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("conv_mlp", [True, False])
def test_convnext_blocks_are_channels_first_and_their_mlp_follows_the_block(conv_mlp):
    # conv_mlp=False: the block permutes to NHWC and runs norm + a Linear MLP channels-last inside
    torch.manual_seed(0)
    base = timm.create_model("convnext_atto", num_classes=3, conv_mlp=conv_mlp).eval()
    x = torch.randn(1, 3, 64, 96)
    tuned = utdsl.compile("stages.0.blocks.* -> sequential adapter(dim=4)\n"
                          "stages.0.blocks.0.mlp -> parallel adapter(dim=2)\n"
                          "stages.0.blocks.0.norm -> sequential affine()", base, x)
    inner = 1 if conv_mlp else -1
    assert axes(tuned) == {
        "stages.0.blocks.0": (1, 1, 40, 364), "stages.0.blocks.1": (1, 1, 40, 364),
        "stages.0.blocks.0.mlp": (inner, inner, 40, 40 * 2 + 2 + 2 * 40 + 40),
        "stages.0.blocks.0.norm": (inner, inner, 40, 80)}
    x2 = torch.randn(1, 3, 96, 64)
    torch.testing.assert_close(tuned(x2), base(x2), rtol=0, atol=0)


@pytest.mark.parametrize("img_size, dim", [((56, 96), 24), (56, 14)])
def test_swin_nhwc_maps_are_channels_last(img_size, dim):
    # (56, 96), 24: stage 0 is B x 14 x 24 x 24 (W == C); (56, 14): 14 x 14 x 14 (H == W == C).
    # swin takes one input size, so the layout comes from the ops around each block
    torch.manual_seed(0)
    base = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=img_size, embed_dim=dim,
                             depths=(2, 2), num_heads=(1, 2)).eval()
    size = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    x = torch.randn(1, 3, *size)
    tuned = utdsl.compile("layers.*.blocks.* -> sequential adapter(dim=4)\n"
                          "layers.0.blocks.0.mlp -> parallel adapter(dim=2)", base, x)
    adapter = lambda c, d: c * d + d + d * c + c  # noqa: E731
    assert axes(tuned) == {
        "layers.0.blocks.0": (-1, -1, dim, adapter(dim, 4)), "layers.0.blocks.1": (-1, -1, dim, adapter(dim, 4)),
        "layers.1.blocks.0": (-1, -1, 2 * dim, adapter(2 * dim, 4)),
        "layers.1.blocks.1": (-1, -1, 2 * dim, adapter(2 * dim, 4)),
        "layers.0.blocks.0.mlp": (-1, -1, dim, adapter(dim, 2))}
    report = verify(base, tuned, x)
    assert report.ok and report.max_abs_diff == 0.0, report.lines()


class FixedSize(nn.Module):
    """A CNN that takes 8x8 inputs only, with 8 channels: its maps are 8x8x8."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        torch._assert(x.shape[-1] == 8, "8x8 inputs only")
        x = self.conv(x)
        x = x + self.block(x)
        return self.head(x.mean((2, 3)))


def test_a_fixed_size_cnn_with_h_w_c_equal_is_channels_first():
    tuned = utdsl.compile("block -> sequential adapter(dim=2)\nblock -> parallel adapter(dim=2)",
                          FixedSize().eval(), torch.randn(1, 3, 8, 8))
    insertions = tuned.meta["utdsl"].plan.insertions
    assert [(i.in_axis, i.out_axis, i.info.out_features) for i in insertions] == [(1, 1, 8), (1, 1, 8)]


def test_vit_tokens_are_channels_last():
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3).eval()
    tuned = utdsl.compile("blocks.0 -> sequential adapter(dim=4)\nblocks.0.mlp -> parallel adapter(dim=4)",
                          base, torch.randn(1, 3, 32, 32))
    assert [a[:3] for a in axes(tuned).values()] == [(-1, -1, 192), (-1, -1, 192)]


# --- conv-shaped lowrank: peft's LoRA Conv2d, written out by hand ------------------------------

class OneConv(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


CONVS = {
    "strided": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    "dilated": dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=2, dilation=2),
    "patchify": dict(in_channels=3, out_channels=5, kernel_size=4, stride=4),
    "pointwise": dict(in_channels=4, out_channels=6, kernel_size=1, stride=2, bias=False),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_lowrank_is_peft_lora_conv2d(case):
    torch.manual_seed(0)
    geometry = CONVS[case]
    model = OneConv(nn.Conv2d(**geometry)).eval()
    r, alpha = 3, 6.0
    tuned = utdsl.compile(f"conv -> parallel lowrank(r={r}, alpha={alpha})", model, torch.randn(1, geometry["in_channels"], 12, 16))
    k, cin, cout = geometry["kernel_size"], geometry["in_channels"], geometry["out_channels"]
    assert utdsl.trainable_parameters(tuned) == cin * r * k * k + r * cout
    unit = tuned.get_submodule("tuners.conv.parallel_lowrank").units["full"]
    with torch.no_grad():
        for p in unit.parameters():
            p.normal_(0.0, 0.5)
    extra = {name: geometry[name] for name in ("stride", "padding", "dilation") if name in geometry}
    down = nn.Conv2d(cin, r, k, bias=False, **extra)
    up = nn.Conv2d(r, cout, 1, bias=False)
    with torch.no_grad():
        down.weight.copy_(unit.down.weight)
        up.weight.copy_(unit.up.weight)
    x = torch.randn(2, cin, 12, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = tuned(x)
    y_ref = model.conv(x_ref) + up(down(x_ref)) * (alpha / r)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y_ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(unit.down.weight.grad, down.weight.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(unit.up.weight.grad, up.weight.grad, rtol=0, atol=1e-5)
    merged = utdsl.merge(tuned)
    assert not any(name.startswith("tuners.") for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), tuned(x), rtol=0, atol=1e-5)


def test_lowrank_on_resnet_downsampling_convs_merges_exactly():
    base = resnet18()
    x = torch.randn(2, 3, 64, 96)
    tuned = utdsl.compile("downsample.0 -> parallel lowrank(r=4)\nlayer2.0.conv1 -> parallel lowrank(r=2)", base, x)
    found = axes(tuned)
    assert found["layer2.0.downsample.0"] == (1, 1, 128, 64 * 4 + 4 * 128)
    assert found["layer2.0.conv1"] == (1, 1, 128, 64 * 2 * 9 + 2 * 128)
    torch.testing.assert_close(tuned(x), base(x), rtol=0, atol=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.startswith("tuners."):
                p.normal_(0.0, 0.05)
        expected = tuned(x)
        merged = utdsl.merge(tuned)
        assert not any(name.startswith("tuners.") for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-5)


def test_lowrank_on_a_grouped_conv_runs_and_stays_unmerged():
    torch.manual_seed(0)
    model = OneConv(nn.Conv2d(4, 8, 3, padding=1, groups=4)).eval()
    tuned = utdsl.compile("conv -> parallel lowrank(r=2)", model, torch.randn(1, 4, 6, 6))
    assert utdsl.trainable_parameters(tuned) == 4 * 2 * 9 + 2 * 8
    assert [i.mergeable for i in tuned.meta["utdsl"].plan.insertions] == [False]   # the plan says so too
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.startswith("tuners."):
                p.normal_(0.0, 0.5)
        x = torch.randn(2, 4, 6, 6)
        merged = utdsl.merge(tuned)
        assert any(name.startswith("tuners.") for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x), tuned(x), rtol=0, atol=0)


# --- parallel tuners that cannot map the input shape to the output shape -----------------------

@pytest.mark.parametrize("site, tuner, shapes", [
    ("layer2.0.downsample.0", "adapter(dim=2)", "1x64x16x24 -> 1x128x8x12"),   # strided 1x1 conv
    ("layer2.0", "adapter(dim=2)", "1x64x16x24 -> 1x128x8x12"),                 # downsampling block
    ("layer2.0", "lowrank(r=2)", "1x64x16x24 -> 1x128x8x12"),                   # a container, not a conv
    ("maxpool", "adapter(dim=2)", "1x64x32x48 -> 1x64x16x24"),                  # same channels, pooled
])
def test_parallel_on_a_site_that_changes_shape_is_an_error_at_the_rule(site, tuner, shapes):
    spec = f"train fc\n{site} -> parallel {tuner}\n"
    with pytest.raises(utdsl.SpecError) as caught:
        utdsl.compile(spec, resnet18(), torch.randn(1, 3, 64, 96))
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.line, diagnostic.column) == (2, 1)
    assert diagnostic.message == (f"{site}: parallel {tuner.split('(')[0]} maps channels position by "
                                  f"position, but this module changes the shape of its value ({shapes})")
    assert "sequential" in diagnostic.hint and "lowrank" in diagnostic.hint


def test_parallel_adapter_on_vit_patch_embed_is_an_error():
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3).eval()
    with pytest.raises(utdsl.SpecError) as caught:
        utdsl.compile("\n  patch_embed -> parallel adapter(dim=2)", base, torch.randn(1, 3, 32, 32))
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.line, diagnostic.column) == (2, 3)
    assert "(1x3x32x32 -> 1x4x192)" in diagnostic.message
