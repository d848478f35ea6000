"""Weights: each file format saved from a tiny ViT and loaded back, head-size mismatches, the
errors for bad files, and where create_model's weights come from."""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from utdsl.errors import ModelError
from utdsl.runtime.models import create_model, default_input_size
from utdsl.runtime.weights import (LoadReport, WeightsSource, head_keys, load_weights, read_state_dict,
                                   warn_if_random, weights_source)


def tiny(num_classes: int = 5, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", img_size=32, num_classes=num_classes, **kwargs)
    with torch.no_grad():  # timm zero-inits biases; make every tensor distinct from a fresh model
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    return tiny(seed=1)


def same(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if k not in skip)


def error_of(call, *args, **kwargs) -> tuple[str, str | None]:
    with pytest.raises(ModelError) as info:
        call(*args, **kwargs)
    return info.value.diagnostics[0].message, info.value.diagnostics[0].hint


# ----------------------------------------------------------------------------- formats

def _save(state: dict, path, wrap: str) -> None:
    if wrap == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif wrap == "plain":
        torch.save(state, path)
    elif wrap == "state_dict":
        torch.save({"state_dict": state, "epoch": 3, "args": {"lr": 0.1}}, path)
    elif wrap == "ddp":
        torch.save({"model": {"module." + k: v for k, v in state.items()}, "optimizer": {}}, path)


@pytest.mark.parametrize("name, wrap", [("w.safetensors", "safetensors"), ("w.pth", "plain"),
                                        ("w.pt", "state_dict"), ("w.bin", "ddp")])
def test_state_dict_formats_round_trip(tmp_path, source, name, wrap):
    path = tmp_path / name
    _save(source.state_dict(), path, wrap)
    target = tiny(seed=2)
    assert not same(source, target)
    report = load_weights(target, path)
    assert same(source, target)
    assert report == LoadReport(str(path), loaded=list(source.state_dict()), skipped={}, missing=[])
    assert report.summary() == f"loaded 80 tensors from {path}"
    assert torch.equal(source(torch.ones(1, 3, 32, 32)), target(torch.ones(1, 3, 32, 32)))


def test_head_of_another_size_is_dropped(tmp_path, source):
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    target = tiny(num_classes=3, seed=2)
    head_before = target.head.weight.clone()
    report = load_weights(target, path)
    assert report.skipped == {"head.weight": "head of another size: file (5, 64), model (3, 64)",
                              "head.bias": "head of another size: file (5,), model (3,)"}
    assert report.missing == ["head.weight", "head.bias"] and len(report.loaded) == 78
    assert torch.equal(target.head.weight, head_before)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(target.state_dict()[k], v) for k, v in body.items())
    assert report.summary() == (f"loaded 78 tensors from {path}; skipped head.weight (head of another size: "
                                "file (5, 64), model (3, 64)), head.bias (head of another size: file (5,), "
                                "model (3,)); initialized anew: head.weight, head.bias")


def test_headless_model_skips_the_file_head(tmp_path, source):
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    report = load_weights(tiny(num_classes=0), path)
    assert report.skipped == {"head.weight": "not in the model", "head.bias": "not in the model"}
    assert (len(report.loaded), report.missing) == (78, [])


def test_position_embedding_resized_by_timm_filter(tmp_path):
    small = tiny(seed=3)  # img_size=32: 4 patches + cls
    path = tmp_path / "w.safetensors"
    torch.manual_seed(3)
    wide = timm.create_model("test_vit", img_size=64, num_classes=5)
    save_file(wide.state_dict(), str(path))
    report = load_weights(small, path)  # img_size=64: 16 patches + cls, resampled to 4
    assert "pos_embed" in report.loaded and small.pos_embed.shape == (1, 5, 64)
    assert torch.equal(small.blocks[0].attn.qkv.weight, wide.blocks[0].attn.qkv.weight)


def test_hub_snapshot_directory(tmp_path, source):
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    target = tiny(seed=2)
    load_weights(target, tmp_path)
    assert same(source, target)


# ----------------------------------------------------------------------------- npz (augreg)

def to_augreg_npz(model: torch.nn.Module, path) -> None:
    """Write ``model`` as a timm/augreg ViT .npz: the inverse of timm's ``_load_weights``."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads
    dim = sd["cls_token"].shape[-1]
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}
    if "head.weight" in sd:
        w["head/kernel"], w["head/bias"] = sd["head.weight"].T, sd["head.bias"]
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for torch_name, jax_name in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            w[p + jax_name + "/scale"], w[p + jax_name + "/bias"] = sd[b + torch_name + ".weight"], sd[b + torch_name + ".bias"]
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for j, name in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[j].T.reshape(dim, heads, -1)
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j].reshape(heads, -1)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = (
            sd[b + "attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0))
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_npz_round_trip(tmp_path, source):
    path = tmp_path / "augreg.npz"
    to_augreg_npz(source, path)
    target = tiny(seed=2)
    report = load_weights(target, path)
    assert (report.skipped, report.missing, len(report.loaded)) == ({}, [], 80)
    sa, sb = source.state_dict(), target.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_npz_head_of_another_size_is_kept(tmp_path, source):
    path = tmp_path / "augreg.npz"
    to_augreg_npz(source, path)
    target = tiny(num_classes=3, seed=2)
    head_before = target.head.weight.clone()
    report = load_weights(target, path)
    why = "head: checkpoint has 5 classes, model 3"
    assert report.skipped == {"head/kernel": why, "head/bias": why}
    assert report.missing == ["head.weight", "head.bias"] and len(report.loaded) == 78
    assert torch.equal(target.head.weight, head_before)
    assert torch.allclose(target.blocks[5].mlp.fc2.weight, source.blocks[5].mlp.fc2.weight)


def test_npz_errors(tmp_path, source):
    path = tmp_path / "augreg.npz"
    to_augreg_npz(tiny(depth=2), path)
    message, _ = error_of(load_weights, tiny(), path)
    assert message == (f"'{path}' is not a big_vision/augreg .npz checkpoint that fits VisionTransformer: "
                       "'Transformer/encoderblock_2/LayerNorm_0/scale is not a file in the archive'")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    message, _ = error_of(load_weights, tiny(), tmp_path / "other.npz")
    assert message.startswith(f"'{tmp_path / 'other.npz'}' is not a big_vision/augreg .npz checkpoint "
                              "that fits VisionTransformer: VisionTransformer.load_pretrained() did not find")
    resnet = timm.create_model("test_resnet", num_classes=3)
    message, hint = error_of(load_weights, resnet, path)
    assert (message, hint) == ("ResNet cannot load .npz weights",
                               "big_vision/augreg .npz files load into timm VisionTransformer models; "
                               "convert others to .safetensors")


# ----------------------------------------------------------------------------- errors

class Payload:
    pass


def test_bad_files(tmp_path, source):
    message, hint = error_of(load_weights, tiny(), tmp_path / "missing.safetensors")
    assert message == f"weights file '{tmp_path / 'missing.safetensors'}' does not exist"
    assert hint == "pass a local .safetensors, .pth, .pt, .bin, .npz file; nothing is downloaded"
    (tmp_path / "w.ckpt").write_bytes(b"x")
    assert error_of(load_weights, tiny(), tmp_path / "w.ckpt") == (
        f"unsupported weights format '.ckpt' ({tmp_path / 'w.ckpt'})",
        "supported: .safetensors, .pth, .pt, .bin, .npz")
    message, hint = error_of(load_weights, tiny(), tmp_path)
    assert (message, hint) == (f"weights path '{tmp_path}' is a directory without model.safetensors or "
                               "pytorch_model.bin", "pass the weights file itself")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    message, _ = error_of(load_weights, tiny(), tmp_path / "junk.safetensors")
    assert message.startswith(f"cannot read weights file '{tmp_path / 'junk.safetensors'}': ")


def test_pickled_objects_are_refused(tmp_path, source):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": source.state_dict(), "extra": Payload()}, path)
    message, hint = error_of(read_state_dict, path)
    assert message.startswith(f"'{path}' holds Python objects besides tensors; refusing to unpickle them (")
    assert hint == "re-save it as a plain state dict, ideally as .safetensors"
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "ns.pth")
    message, _ = error_of(read_state_dict, tmp_path / "ns.pth")
    assert "refusing to unpickle" in message


def test_no_matching_keys_and_other_architectures(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, str(path))
    message, hint = error_of(load_weights, tiny(), path)
    assert message == f"no tensor in '{path}' matches a parameter of VisionTransformer"
    assert hint == ("the file has keys like fc.bias, fc.weight; the model has cls_token, pos_embed, "
                    "patch_embed.proj.weight")
    save_file(tiny(depth=2).state_dict(), str(path))
    message, hint = error_of(load_weights, tiny(), path)
    assert message == (f"'{path}' does not fit VisionTransformer: 48 parameters are not in the file: "
                       "blocks.2.norm1.weight, blocks.2.norm1.bias, blocks.2.attn.qkv.weight")
    assert hint == ("weights of another architecture or size? check the model name "
                    "(load_weights(..., strict=False) loads only what fits)")
    save_file(tiny(mlp_ratio=2).state_dict(), str(path))
    message, _ = error_of(load_weights, tiny(), path)
    assert message == (f"'{path}' does not fit VisionTransformer: 18 tensors have other shapes: "
                       "blocks.0.mlp.fc1.weight (file (128, 64), model (192, 64)), blocks.0.mlp.fc1.bias "
                       "(file (128,), model (192,)), blocks.0.mlp.fc2.weight (file (64, 128), model (64, 192))")
    report = load_weights(tiny(), path, strict=False)
    assert (len(report.loaded), len(report.missing), len(report.skipped)) == (62, 18, 18)
    assert report.skipped["blocks.5.mlp.fc2.weight"] == "other shape: file (64, 128), model (64, 192)"


def test_meta_model_cannot_load(tmp_path, source):
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    with torch.device("meta"):
        model = timm.create_model("test_vit", img_size=32, num_classes=5)
    assert error_of(load_weights, model, path) == (
        "cannot load weights into a model built on the meta device",
        "build the model on 'cpu' or a GPU to load weights")


# ----------------------------------------------------------------------------- create_model

def test_create_model_with_weights_file(tmp_path, source):
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model("test_vit", img_size=32, num_classes=3, weights=path)
    source_info = weights_source(model)
    assert (source_info.kind, source_info.detail, source_info.is_random) == ("file", str(path), False)
    assert source_info.report.missing == ["head.weight", "head.bias"]
    assert torch.equal(model.blocks[1].attn.proj.weight, source.blocks[1].attn.proj.weight)
    assert default_input_size(model) == (3, 32, 32) and head_keys(model) == ["head.weight", "head.bias"]
    assert warn_if_random(model) is None
    assert source_info.describe() == f"weights from {path}"


def test_create_model_argument_errors(tmp_path):
    assert error_of(create_model, "test_vit", pretrained=True, weights=tmp_path / "w.pth") == (
        "pass either pretrained weights or a weights file, not both",
        "--weights FILE loads a local file; --pretrained fetches timm's")
    assert error_of(create_model, "test_vit", device="meta", weights=tmp_path / "w.pth") == (
        "a model built on the meta device holds no weights to load", "build it on 'cpu' or a GPU")
    message, hint = error_of(create_model, "test_vit", weights=tmp_path / "w.pth")
    assert message == f"weights file '{tmp_path / 'w.pth'}' does not exist"


def test_pretrained_offline_is_a_model_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    message, hint = error_of(create_model, "test_vit", pretrained=True)
    assert message.startswith("cannot fetch pretrained weights for 'test_vit': ")
    assert hint == ("offline? pass --weights FILE (.safetensors, .pth, .npz) with the weights saved "
                    "locally")


def test_random_init_warning():
    model = create_model("test_vit", img_size=32, num_classes=3)
    assert weights_source(model) == WeightsSource("random")
    said = []
    message = warn_if_random(model, echo=said.append)
    assert said == [message] and message == (
        "the backbone has random weights (no --weights FILE, no --pretrained): a frozen random backbone "
        "learns little, and results will be far below published numbers")
    with pytest.warns(UserWarning, match="the backbone has random weights"):
        warn_if_random(WeightsSource("random"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_random(WeightsSource("hub", "vit_base_patch16_224.augreg_in21k")) is None
        assert warn_if_random(None) is None
    assert WeightsSource("hub", "x").describe() == "pretrained weights of timm's 'x'"
