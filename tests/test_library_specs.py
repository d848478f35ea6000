"""The method library: exact parameter counts on ViT-B/16 and identity at init on a real model."""

from __future__ import annotations

import pytest
import torch

import utdsl
from utdsl.library import library_specs
from utdsl.verify import verify

from .conftest import meta_model, tiny_vit, trainable_without_head

# trainable parameters on vit_base_patch16_224, classifier head excluded
EXPECTED = {
    "lora": 294_912,             # q and v, r=8: 12 x 2 x (8x768 + 768x8)
    "adapter": 156_768,          # 12 x (768x8 + 8 + 8x768 + 768)
    "bitfit": 102_912,           # every bias: 12 x 8,448 + patch embed 768 + final norm 768
    "ssf": 205_824,              # 12 x 16,896 + patch embed 1,536 + final norm 1,536
    "ia3": 55_296,               # 12 x (768 k + 768 v + 3,072 MLP hidden)
    "adaptformer": 1_189_632,    # 12 x (768x64 + 64 + 64x768 + 768)
    "utuning_parallel_attn": 304_320,
    "utuning_parallel_mlp": 304_320,
    "utuning_parallel_block": 304_320,
    "utuning_sequential_attn": 304_320,
    "utuning_sequential_block": 304_320,
    # weight-space methods
    "lora_weight": 294_912,      # = lora
    "dora": 313_344,             # lora + a magnitude per output row: 24 x 768
    "vera": 24_576,              # 24 sites x (d: 256 + b: 768); the paper's "24.6K" on ViT-B
    "loha": 589_824,             # 24 x 2 x (8x768 + 8x768)
    "lokr": 26_112,              # 24 x (W1 24x24 + B2 32x8 + A2 8x32): peft's factorisation 768 = 24 x 32
    "oft": 285_696,              # 24 x 24 blocks x 32*31/2 skew entries
    "boft": 92_160,              # 24 x (192 blocks x 4x4 + 768 output scales), peft's layout
    "fact_tt": 21_504,           # shared U, V 2 x 768x8 + 12 x (4 x 8x8 + fc1 32x8 + fc2 8x32)
    "fact_tk": 13_952,           # shared U, V 12,288 + core 8^3 + P 8 x 144 columns
}


@pytest.fixture(scope="module")
def vit_b16():
    return meta_model()


@pytest.mark.parametrize("name, expected", sorted(EXPECTED.items()))
def test_trainable_parameters_on_vit_b16(vit_b16, name, expected):
    tuned = utdsl.compile(name, vit_b16)
    assert trainable_without_head(tuned) == expected
    head = sum(p.numel() for n, p in tuned.named_parameters() if n.startswith("head"))
    assert utdsl.trainable_parameters(tuned) == expected + head  # every library spec trains the head


def test_every_library_spec_has_a_header_and_compiles(vit_b16):
    names = [p.stem for p in library_specs()]
    assert set(EXPECTED) <= set(names)
    for path in library_specs():
        spec = utdsl.load_spec(path)
        assert spec.name == path.stem, path
        assert spec.description, path
        utdsl.compile(spec, vit_b16)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_identity_at_init_and_only_tuners_train(name):
    base = tiny_vit()
    tuned = utdsl.compile(name, base)
    torch.manual_seed(3)
    report = verify(base, tuned, torch.randn(2, 3, 32, 32))
    assert report.identity_expected
    assert report.max_abs_diff == 0.0
    assert report.ok, report.lines()


# token-level methods: not the identity at init (prompts and prefixes enter every attention)
TOKEN_LEVEL = {
    "vpt_shallow": 38_400,               # 768 x 50 prompts at the input of the block stack
    "vpt_deep": 92_160,                  # 12 x 768 x 10 prompts, one set per block
    "prefix": 184_320,                   # 12 x 2 x 10 x 768 keys and values
    "mam": 10_005_504,                   # 12 x 2 x 30 x 768 + 12 x (768x512 + 512 + 512x768 + 768)
    "utuning_prefix_adapter": 488_640,   # prefix 184,320 + parallel adapter 16 on the MLP 304,320
}


def test_list_shows_every_spec_with_its_description_and_parameters(capsys):
    from utdsl.cli import main

    main(["list"])
    out = capsys.readouterr().out
    assert "n/a" not in out
    for path in library_specs():
        assert path.stem in out, path.stem
    for name, expected in TOKEN_LEVEL.items():
        row = next(line for line in out.splitlines() if line.startswith(f"│ {name} "))
        assert row.rstrip(" │").endswith(f"{expected:,}"), row


# lora / ia3 / ssf on families that use their weights functionally (BEiT, SwinV2: F.linear on
# qkv.weight) or split q, k, v and gate the MLP (EVA-02 base: q_proj, k_proj, v_proj, fc1_g, fc1_x)
FAMILY_COUNTS = {
    # 12 x 2 x 8 x (768 + 768); 12 x (768 k + 768 v + 2,048 SwiGLU hidden);
    # 12 x 2 x (4 x 768 + 2 x 2,048 + 768 + 2 x 768) + patch embed 1,536 + final norm 1,536
    "eva02_base_patch14_224": {"lora": 294_912, "ia3": 43_008, "ssf": 230_400},
    "beit_base_patch16_224": {"lora": 294_912, "ia3": 55_296, "ssf": 205_824},
    # blocks (2, 2, 6, 2) of C = 96, 192, 384, 768 (sum of C over blocks: 4,416): 32 C, 6 C, 22 C
    # per block; ssf adds patch embed 2 x 96 and the final norm 2 x 768
    "swinv2_tiny_window8_256": {"lora": 141_312, "ia3": 26_496, "ssf": 98_880},
}


@pytest.mark.parametrize("model, spec", [(m, s) for m in FAMILY_COUNTS for s in ("lora", "ia3", "ssf")])
def test_lora_ia3_ssf_counts_on_eva02_beit_swinv2(model, spec):
    assert trainable_without_head(utdsl.compile(spec, meta_model(model))) == FAMILY_COUNTS[model][spec]


@pytest.mark.parametrize("spec", ["lora", "ia3", "ssf"])
def test_lora_ia3_ssf_are_the_identity_at_init_on_eva02_with_split_projections(spec):
    import timm

    torch.manual_seed(0)
    base = timm.create_model("eva02_base_patch14_224", img_size=28, depth=1, embed_dim=64, num_heads=2,
                             num_classes=3).eval()
    x = torch.randn(2, 3, 28, 28)
    tuned = utdsl.compile(spec, base, x)
    assert {i.site.rsplit(".", 1)[-1] for i in tuned.meta["utdsl"].plan.insertions} >= (
        {"q_proj", "v_proj"} if spec == "lora" else {"k_proj", "v_proj"})
    report = verify(base, tuned, x)
    assert report.ok and report.max_abs_diff == 0.0, report.lines()
