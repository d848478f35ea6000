"""The family matrix: small models of every backbone family utdsl promises, the spec of each
placement on each, and a runner that says what happened.

A cell is ``works`` (compiled; runs at its input size; equals the base at init where the tuner
promises it; a backward step reaches only what trains; for ``merge``: the merged model has no
tuner left and equals the tuned one) or ``error`` (a ``UtdslError`` at compile, whose message is
the cell's reason). Anything else (another exception, a wrong output) is a ``defect``. Used by
``tests/test_family_matrix.py`` and by ``scripts/family_matrix.py``, which prints the README table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import utdsl
from utdsl.errors import UtdslError
from utdsl.placements.base import has_module

__all__ = ["Family", "FAMILIES", "COLUMNS", "Outcome", "run_cell"]

COLUMNS = ("lowrank", "adapter", "affine", "prompt", "prefix", "merge")


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    sites: dict[str, str]               # column -> selector (merge uses lowrank's and affine's)
    slow: bool = False                  # over a few seconds a cell on 2 cores
    extra: str = "timm"                 # what must be importable: timm, torchvision, transformers
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor] = field(default=lambda m, x: m(x))


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, num_classes=5, **kwargs)
    return build


_VIT_SITES = dict(lowrank="attn.qkv{q, v}", adapter="blocks.*", affine="attn.qkv | norm1",
                  prompt="blocks.*", prefix="blocks.*.attn")
_SWIN_SITES = dict(lowrank="attn.qkv{q, v}", adapter="layers.*.blocks.*", affine="attn.qkv | norm1",
                   prompt="layers.*.blocks.*", prefix="layers.*.blocks.*.attn")
_STAGE_SITES = dict(lowrank="attn.qkv", adapter="stages.*.blocks.*", affine="norm1",
                    prompt="stages.*.blocks.*", prefix="stages.*.blocks.*.attn")

FAMILIES: dict[str, Family] = {
    "vit": Family(_timm("vit_tiny_patch16_224", img_size=32, depth=2), (2, 3, 32, 32), _VIT_SITES),
    "deit": Family(_timm("deit_tiny_distilled_patch16_224", img_size=32, depth=2), (2, 3, 32, 32), _VIT_SITES),
    "eva02": Family(_timm("eva02_tiny_patch14_224", img_size=28, depth=2), (2, 3, 28, 28), _VIT_SITES),
    "beit": Family(_timm("beit_base_patch16_224", img_size=32, depth=2, embed_dim=64, num_heads=2),
                   (2, 3, 32, 32), _VIT_SITES),
    "dinov2_reg": Family(_timm("vit_small_patch14_reg4_dinov2", img_size=28, depth=2, embed_dim=64, num_heads=2),
                         (2, 3, 28, 28), _VIT_SITES),
    "swin": Family(_timm("swin_tiny_patch4_window7_224", img_size=56, embed_dim=24, depths=(2, 2),
                         num_heads=(1, 2)), (2, 3, 56, 56), _SWIN_SITES),
    "swinv2": Family(_timm("swinv2_tiny_window8_256", img_size=64, embed_dim=24, depths=(2, 2),
                           num_heads=(1, 2), window_size=8), (2, 3, 64, 64), _SWIN_SITES),
    "convnext": Family(_timm("convnext_atto"), (2, 3, 64, 64),
                       dict(lowrank="mlp.fc1 | mlp.fc2", adapter="stages.*.blocks.*", affine="conv_dw | norm",
                            prompt="stages.*.blocks.*", prefix="stages.*.blocks.*")),
    "resnet": Family(_timm("resnet10t"), (2, 3, 64, 64),
                     dict(lowrank="layer1.*.conv1 | layer2.0.conv1 | downsample.1", adapter="layer1.* | layer2.*",
                          affine="bn1 | bn2", prompt="layer1.*", prefix="layer1.*")),
    "efficientnet": Family(_timm("efficientnet_b0"), (2, 3, 64, 64),
                           dict(lowrank="conv_pwl", adapter="blocks.*.*", affine="bn1 | bn2",
                                prompt="blocks.*.*", prefix="blocks.*.*"), slow=True),
    "mobilevit": Family(_timm("mobilevit_xxs"), (2, 3, 64, 64),
                        dict(lowrank="attn.qkv{q, v}", adapter="transformer.*", affine="attn.qkv | norm1",
                             prompt="transformer.*", prefix="transformer.*.attn")),
    "maxvit": Family(_timm("maxvit_pico_rw_256", img_size=64), (2, 3, 64, 64),
                     dict(lowrank="attn.qkv", adapter="stages.*.blocks.*", affine="attn.qkv | norm1",
                          prompt="stages.*.blocks.*", prefix="attn_block.attn | attn_grid.attn"), slow=True),
    "levit": Family(_timm("levit_128s", img_size=64), (2, 3, 64, 64),
                    dict(lowrank="qkv.linear", adapter="stages.*.blocks.*", affine="qkv.linear",
                         prompt="stages.*.blocks.*", prefix="stages.*.blocks.*.attn"), slow=True),
    "pvt_v2": Family(_timm("pvt_v2_b0"), (2, 3, 64, 64),
                     dict(lowrank="attn.q | attn.kv{1 of 2}", adapter="stages.*.blocks.*", affine="norm1",
                          prompt="stages.*.blocks.*", prefix="stages.*.blocks.*.attn")),
    "hiera": Family(_timm("hiera_tiny_224", img_size=64, embed_dim=32, num_heads=1, stages=(1, 1, 1, 1)),
                    (2, 3, 64, 64), dict(lowrank="attn.qkv", adapter="blocks.*", affine="norm1",
                                         prompt="blocks.*", prefix="blocks.*.attn")),
}



def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=5, **kwargs)
    return build


def _transformers(model: str, config: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        options = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        return getattr(transformers, model)(getattr(transformers, config)(**{**options, **kwargs}))
    return build


def _hf_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


_HF_SITES = dict(lowrank="attention.q_proj | attention.v_proj", adapter="mlp", affine="q_proj | v_proj",
                 prompt="layers.* | layer.*", prefix="layers.*.attention | layer.*.attention")

FAMILIES.update({
    "tv_vit": Family(_torchvision("VisionTransformer", image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                  hidden_dim=64, mlp_dim=128), (2, 3, 32, 32),
                     dict(lowrank="self_attention.in_proj{q, v}", adapter="encoder.layers.*",
                          affine="self_attention.in_proj | ln_1", prompt="encoder.layers.*",
                          prefix="self_attention"), extra="torchvision"),
    "tv_resnet": Family(_torchvision("resnet18"), (2, 3, 64, 64),
                        dict(lowrank="layer1.*.conv1 | layer2.0.conv1 | downsample.0", adapter="layer1.* | layer2.*",
                             affine="bn1 | bn2", prompt="layer1.*", prefix="layer1.*"), extra="torchvision"),
    "hf_vit": Family(_transformers("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=16,
                                   num_labels=5), (2, 3, 32, 32), _HF_SITES, extra="transformers", call=_hf_output),
    "hf_dinov2": Family(_transformers("Dinov2Model", "Dinov2Config", image_size=28, patch_size=14), (2, 3, 28, 28),
                        dict(_HF_SITES, prefix="encoder.layer.*.attention"), extra="transformers", call=_hf_output),
    "hf_clip_vision": Family(_transformers("CLIPVisionModel", "CLIPVisionConfig", image_size=32, patch_size=16),
                             (2, 3, 32, 32), dict(_HF_SITES, lowrank="self_attn.q_proj | self_attn.v_proj",
                                                  prefix="self_attn"), extra="transformers", call=_hf_output),
})

#: spec of each column on a family's sites
_RULES = {
    "lowrank": "{lowrank} -> parallel lowrank(r=4)",
    "adapter": "{adapter} -> sequential adapter(dim=8)",
    "affine": "{affine} -> sequential affine()",
    "prompt": "{prompt} -> prompt tokens(length=3)",
    "prefix": "{prefix} -> prefix kv(length=3)",
    "merge": "{lowrank} -> parallel lowrank(r=4)\n{affine} -> sequential affine()",
}


@dataclass(frozen=True)
class Outcome:
    kind: str          # works | error | defect
    detail: str = ""


def spec_of(family: Family, column: str) -> str:
    return _RULES[column].format(**family.sites) + "\ntrain @classifier"


def run_cell(name: str, column: str) -> Outcome:
    """Compile ``column``'s spec into family ``name`` and check what the matrix promises."""
    family = FAMILIES[name]
    torch.manual_seed(0)
    base = family.build().eval()
    x = torch.randn(*family.input_shape)
    try:
        tuned = utdsl.compile(spec_of(family, column), base, x)
    except UtdslError as error:
        return Outcome("error", error.diagnostics[0].message if error.diagnostics else str(error))
    try:
        return _check(family, column, base, tuned, x)
    except Exception as error:  # the matrix reports a defect rather than stopping at it
        return Outcome("defect", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def _check(family: Family, column: str, base: nn.Module, tuned: nn.Module, x: torch.Tensor) -> Outcome:
    plan = tuned.meta["utdsl"].plan
    with torch.no_grad():
        expected, got = family.call(base, x), family.call(tuned, x)
    if got.shape != expected.shape:
        return Outcome("defect", f"output {tuple(got.shape)} != base {tuple(expected.shape)}")
    if all(i.identity_at_init for i in plan.insertions) and not torch.allclose(got, expected, atol=1e-5, rtol=1e-5):
        return Outcome("defect", f"not the base at init: max diff {(got - expected).abs().max():.2e}")
    tuned.train()
    family.call(tuned, x).square().mean().backward()
    tuned.eval()
    grads = {n for n, p in tuned.named_parameters() if p.grad is not None}
    allowed = {n for n, p in tuned.named_parameters() if p.requires_grad}
    if not grads or not grads <= allowed:
        return Outcome("defect", f"gradients reach {sorted(grads - allowed)[:3]}")
    if column != "merge":
        return Outcome("works", f"{plan.tuner_params:,} tuner params")
    _perturb(tuned)
    merged = utdsl.merge(tuned)
    left = [i.module_name for i in plan.insertions if has_module(merged, i.module_name)]
    with torch.no_grad():
        diff = (family.call(merged, x) - family.call(tuned, x)).abs().max().item()
    if diff > 1e-4:
        return Outcome("defect", f"merged differs from tuned by {diff:.2e}")
    if left:
        return Outcome("works", f"{len(left)} of {len(plan.insertions)} tuners stay unmerged")
    return Outcome("works", "all tuners folded")


def _perturb(model: nn.Module) -> None:
    """Random non-zero tuner values, so a zero init hides nothing from the merge check."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("tuners."):
                p.add_(torch.randn(p.shape, generator=generator).to(p) * 0.05)
