"""A checkpoint's identity includes its tuners' arguments: loading LoRA trained with ``alpha=8`` into
a model compiled with ``alpha=16`` is refused, naming the site, the tuner and the argument."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import utdsl
from utdsl.checkpoint import read_metadata
from utdsl.errors import CheckpointError

from .conftest import tiny_vit

LORA = "attn.qkv{{q, v}} -> parallel lowrank(r=4, {args})\n"


def lora(args: str = "alpha=8.0") -> torch.nn.Module:
    model = utdsl.compile(LORA.format(args=args), tiny_vit())
    with torch.no_grad():  # a trained-looking update, so a wrong scale shows in the output
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("saved, loaded, message", [
    ("alpha=8.0", "alpha=16.0", "blocks.0.attn.qkv{q, v} lowrank: alpha is 8.0 in the checkpoint, 16.0 in this model"),
    ("alpha=8.0", "alpha=8.0, dropout=0.1", "lowrank: dropout is 0.0 in the checkpoint, 0.1 in this model"),
    ("alpha=8.0", "alpha=8.0, init=\"gaussian\"",
     "lowrank: init is 'kaiming' in the checkpoint, 'gaussian' in this model"),
])
def test_other_arguments_are_refused(tmp_path, saved, loaded, message):
    path = utdsl.save_tuners(lora(saved), tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="other tuner arguments") as error:
        utdsl.load_tuners(utdsl.compile(LORA.format(args=loaded), tiny_vit()), path)
    assert message in str(error.value)


def test_same_arguments_load_and_give_the_same_output(tmp_path, images):
    tuned = lora("alpha=8.0, dropout=0.1").eval()
    path = utdsl.save_tuners(tuned, tmp_path / "lora.safetensors")
    fresh = utdsl.compile(LORA.format(args="alpha=8.0, dropout=0.1"), tiny_vit()).eval()
    utdsl.load_tuners(fresh, path)
    torch.testing.assert_close(fresh(images), tuned(images), rtol=0, atol=0)


def test_signature_records_the_arguments(tmp_path):
    path = utdsl.save_tuners(lora(), tmp_path / "lora.safetensors")
    site, placement, tuner, args = json.loads(read_metadata(path)["plan"])[0]
    assert (site, placement, tuner) == ("blocks.0.attn.qkv{q, v}", "parallel", "lowrank")
    assert args == {"r": 4, "alpha": 8.0, "dropout": 0.0, "init": "kaiming"}


def old_format(path, tmp_path):
    """``path`` rewritten as the previous format wrote it: a signature without arguments."""
    meta = read_metadata(path)
    meta["plan"] = json.dumps([entry[:3] for entry in json.loads(meta["plan"])])
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=meta)
    return old


def test_checkpoint_without_arguments_still_loads(tmp_path, images):
    tuned = lora().eval()
    old = old_format(utdsl.save_tuners(tuned, tmp_path / "lora.safetensors"), tmp_path)
    fresh = utdsl.compile(LORA.format(args="alpha=8.0"), tiny_vit()).eval()
    utdsl.load_tuners(fresh, old)
    torch.testing.assert_close(fresh(images), tuned(images), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="its tuners sit elsewhere"):  # sites are still checked
        utdsl.load_tuners(utdsl.compile("blocks.*.mlp.fc2 -> parallel lowrank(r=4)", tiny_vit()), old)


def test_batch_norm_statistics_updated_in_training_travel_with_the_checkpoint(tmp_path):
    import timm

    torch.manual_seed(0)
    base = timm.create_model("resnet10t", num_classes=3).eval()
    spec = "layer1.*.conv1 -> parallel lowrank(r=2)\ntrain @classifier"
    x = torch.randn(4, 3, 32, 32)
    trained = utdsl.compile(spec, base, x).train()
    trained(x * 3 + 1)                     # a train-mode step moves every running mean and variance
    path = utdsl.save_tuners(trained, tmp_path / "t.safetensors")
    assert "bn1.running_mean" in load_file(str(path))
    fresh = utdsl.compile(spec, base, x)
    utdsl.load_tuners(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))
        assert not torch.equal(base(x), trained(x))   # the statistics did move
