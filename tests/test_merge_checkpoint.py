"""utdsl.merge folds lowrank and affine into weights; tuner checkpoints round-trip and refuse the
wrong model or spec."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import utdsl

from .conftest import tiny_vit


def trained(spec: str, seed: int = 5):
    tuned = utdsl.compile(spec, tiny_vit())
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    return tuned


@pytest.mark.parametrize("spec, left", [
    ("lora", 0), ("ia3", 0),
    ("ssf", 0),  # the patch embedding's affine folds into its conv, through flatten and transpose
    ("attn.qkv{q, v} -> parallel lowrank(r=4)\nattn.qkv -> sequential affine()\nmlp -> sequential adapter(dim=4)", 2),
])
def test_merge_folds_mergeable_tuners_with_equal_outputs(spec, left, images):
    tuned = trained(spec)
    merged = utdsl.merge(tuned)
    torch.testing.assert_close(merged(images), tuned(images), rtol=0, atol=1e-5)
    tuner_nodes = [n for n in merged.graph.nodes if n.op == "call_module" and n.target.startswith("tuners.")]
    assert len(tuner_nodes) == left
    assert tuned.get_submodule("tuners")  # the input model keeps its tuners


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_an_affine_after_a_batch_norm_folds_into_it_in_either_mode(mode):
    import timm

    torch.manual_seed(0)
    base = timm.create_model("resnet10t", num_classes=3).eval()
    x = torch.randn(4, 3, 40, 56)
    tuned = utdsl.compile("bn1 | bn2 -> sequential affine()", base, x)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1).add_(1.0)
    merged = utdsl.merge(tuned)
    assert not [n for n in merged.graph.nodes if n.op == "call_module" and n.target.startswith("tuners.")]
    getattr(tuned, mode)(), getattr(merged, mode)()   # train mode: batch statistics, same algebra
    with torch.no_grad():
        torch.testing.assert_close(merged(x), tuned(x), rtol=1e-5, atol=1e-5)


def test_merged_inference_has_the_base_graph_shape(images):
    base = tiny_vit()
    merged = utdsl.merge(trained("lora"))
    base_calls = [n.target for n in utdsl.trace.trace(base).graph.nodes if n.op == "call_module"]
    assert [n.target for n in merged.graph.nodes if n.op == "call_module"] == base_calls


def test_save_and_load_round_trip(tmp_path, images):
    tuned = trained("lora")
    path = utdsl.save_tuners(tuned, tmp_path / "ckpt" / "lora.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["lora.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert meta["model"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert "attn.qkv{q, v} | attn.q_proj | attn.v_proj -> parallel lowrank" in meta["spec"]
    fresh = utdsl.compile("lora", tiny_vit())
    assert not torch.equal(fresh(images), tuned(images))
    utdsl.load_tuners(fresh, path)
    torch.testing.assert_close(fresh(images), tuned(images), rtol=0, atol=0)


def test_loading_into_another_spec_is_a_clear_error(tmp_path):
    path = utdsl.save_tuners(trained("lora"), tmp_path / "a.safetensors")
    with pytest.raises(utdsl.CheckpointError, match="written for another spec \\('lora'\\)"):
        utdsl.load_tuners(utdsl.compile("adapter", tiny_vit()), path)


def test_loading_into_another_model_is_a_clear_error(tmp_path):
    import timm

    path = utdsl.save_tuners(trained("lora"), tmp_path / "a.safetensors")
    other = timm.create_model("vit_small_patch16_224", img_size=32, depth=2, num_classes=10)
    with pytest.raises(utdsl.CheckpointError, match="trained on model 'vit_tiny_patch16_224.augreg_in21k_ft_in1k', "
                                                    "this model is 'vit_small_patch16_224"):
        utdsl.load_tuners(utdsl.compile("lora", other), path)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(utdsl.CheckpointError, match="is not a safetensors file"):
        utdsl.load_tuners(trained("lora"), bad)
    with pytest.raises(utdsl.CheckpointError, match="not found"):
        utdsl.load_tuners(trained("lora"), tmp_path / "missing.safetensors")
