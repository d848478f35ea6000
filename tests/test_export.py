"""Export: a merged plain timm state dict, PEFT LoRA adapters in both directions (against the real
peft package), their refusals with exact messages, and ``utdsl export`` on a trained run."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import utdsl
from utdsl.errors import CheckpointError, ModelError

from .conftest import tiny_vit

TINY = dict(img_size=32, depth=2, num_classes=10)


def randomize(model, seed: int = 3, std: float = 0.1):
    """Move every trainable parameter away from its init (B = 0 would hide a wrong layout)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()


def max_diff(a, b, x) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def tuned(spec: str):
    return randomize(utdsl.compile(spec, tiny_vit()))


# --- merged ---------------------------------------------------------------------------------------

MERGEABLE = """\
attn.qkv{q, v} -> weight lora(r=4, alpha=8)
mlp.fc1 -> parallel lowrank(r=2)
norm1 | mlp.fc2 -> sequential affine()
train @classifier
"""


def test_merged_export_loads_into_plain_timm(tmp_path, images):
    model = tuned(MERGEABLE)
    path = utdsl.export_merged(model, tmp_path / "model.safetensors")
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=True, **TINY,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    assert max_diff(model, plain, images) <= 1e-5
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(tiny_vit().state_dict())
        assert f.metadata()["utdsl.model"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.mark.parametrize("spec, message", [
    ("blocks.*.mlp -> parallel adapter(dim=4)\n",
     "cannot export a merged model: 2 insertion(s) cannot be folded into the weights and would stay in "
     "the graph: blocks.0.mlp (parallel adapter, line 1), blocks.1.mlp (parallel adapter, line 1)"),
    ("attn.qkv -> parallel lowrank(r=2)\n^blocks -> prompt tokens(length=2)\n",
     "cannot export a merged model: 1 insertion(s) cannot be folded into the weights and would stay in "
     "the graph: blocks (prompt tokens, line 2)"),
])
def test_merged_export_refuses_tuners_that_stay(tmp_path, spec, message):
    with pytest.raises(ModelError) as error:
        utdsl.export_merged(tuned(spec), tmp_path / "model.safetensors")
    assert error.value.diagnostics[0].message == message
    assert not (tmp_path / "model.safetensors").exists()


# --- PEFT, utdsl -> peft --------------------------------------------------------------------------

@pytest.mark.parametrize("spec, fields", [
    ("attn.qkv{q, v} -> weight lora(r=4, alpha=8)\ntrain @classifier\n",
     dict(r=8, lora_alpha=16.0, use_dora=False, rank_pattern={}, modules_to_save=["head"])),
    ("attn.qkv{q, v} -> parallel lowrank(r=4, alpha=8)\nmlp.fc1 -> parallel lowrank(r=3)\n",
     dict(r=8, lora_alpha=16.0, use_dora=False, rank_pattern={r"blocks\.0\.mlp\.fc1": 3, r"blocks\.1\.mlp\.fc1": 3},
          modules_to_save=None)),
    ("attn.qkv{q, v} -> weight dora(r=4, alpha=8)\nmlp.fc2 -> weight dora(r=3)\ntrain @classifier\n",
     dict(r=8, lora_alpha=16.0, use_dora=True, modules_to_save=["head"])),
    ("attn.qkv -> weight lora(r=2)\nattn.qkv{v} -> parallel lowrank(r=3, alpha=1)\n",
     dict(r=5, lora_alpha=5.0, target_modules=["blocks.0.attn.qkv", "blocks.1.attn.qkv"])),
])
def test_peft_export_equals_the_tuned_model(tmp_path, images, spec, fields):
    peft = pytest.importorskip("peft")
    model = tuned(spec)
    utdsl.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in fields} == fields
    loaded = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path)).eval()
    assert max_diff(model, loaded, images) <= 1e-5


def test_peft_export_key_names(tmp_path):
    utdsl.export_peft(tuned("attn.qkv{q, v} -> weight dora(r=2)\ntrain @classifier\n"), tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(k for k in state if "blocks.0" in k or "head" in k) == [
        "base_model.model.blocks.0.attn.qkv.lora_A.weight", "base_model.model.blocks.0.attn.qkv.lora_B.weight",
        "base_model.model.blocks.0.attn.qkv.lora_magnitude_vector", "base_model.model.head.bias",
        "base_model.model.head.weight"]
    A, B = state["base_model.model.blocks.0.attn.qkv.lora_A.weight"], state["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert A.shape == (4, 192) and B.shape == (576, 4)
    assert not B[192:384].any() and not B[:192, 2:].any() and not B[384:, :2].any()  # k untouched, blocks


@pytest.mark.parametrize("spec, message", [
    ("blocks.*.mlp -> parallel adapter(dim=4)\nattn.qkv -> weight lora(r=2)\n",
     "cannot export as PEFT LoRA: 2 insertion(s) are not LoRA or DoRA: blocks.0.mlp (parallel adapter, line 1), "
     "blocks.1.mlp (parallel adapter, line 1)"),
    ("attn.qkv -> weight lora(r=2)\nmlp.fc1 -> weight dora(r=2)\n",
     "cannot export as PEFT LoRA: the spec mixes DoRA and LoRA sites, and peft's use_dora applies to every target"),
    ("blocks.*.mlp -> parallel lowrank(r=2)\n",
     "cannot export blocks.0.mlp (parallel lowrank, line 1) as PEFT LoRA: only nn.Linear sites are exported, "
     "'blocks.0.mlp' is not one"),
    ("attn.qkv -> weight lora(r=2)\ntrain ^cls_token\n",
     "cannot export as PEFT LoRA: trained parameter(s) cls_token belong to no submodule, and peft's "
     "modules_to_save holds whole modules"),
    ("attn.qkv -> weight lora(r=2)\ntrain attn.qkv.bias\n",
     "cannot export as PEFT LoRA: 'blocks.0.attn.qkv' both has LoRA and trains its own parameters; peft's "
     "modules_to_save cannot wrap a LoRA target"),
])
def test_peft_export_refusals(tmp_path, spec, message):
    with pytest.raises(ModelError) as error:
        utdsl.export_peft(tuned(spec), tmp_path)
    assert error.value.diagnostics[0].message == message


# --- PEFT, peft -> utdsl --------------------------------------------------------------------------

def peft_adapter(tmp_path, **config):
    peft = pytest.importorskip("peft")
    options = dict(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"])
    options.update(config)
    model = peft.get_peft_model(tiny_vit(), peft.LoraConfig(**options))
    randomize(model, seed=5)
    model.save_pretrained(str(tmp_path))
    return model


@pytest.mark.parametrize("config", [
    dict(),
    dict(rank_pattern={"fc1": 2}, alpha_pattern={"blocks.1.attn.qkv": 3}),
    dict(use_dora=True, target_modules=["attn.proj", "fc2"]),
    dict(use_rslora=True, target_modules=r".*\.qkv", modules_to_save=None),
])
def test_load_peft_equals_peft(tmp_path, images, config):
    reference = peft_adapter(tmp_path, **config).eval()
    model = utdsl.load_peft(tiny_vit(), tmp_path).eval()
    assert max_diff(model, reference, images) <= 1e-5
    # and back: the loaded model exports an adapter peft reads to the same outputs
    utdsl.export_peft(model, tmp_path / "again")
    import peft

    again = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path / "again")).eval()
    assert max_diff(again, reference, images) <= 1e-5


def test_load_peft_spec_text(tmp_path):
    peft_adapter(tmp_path, rank_pattern={"fc1": 2})
    from utdsl.peft_import import peft_spec

    text, _, saved = peft_spec(json.loads((tmp_path / "adapter_config.json").read_text()), tiny_vit())
    assert text.splitlines()[1:] == [
        "^blocks.0.attn.qkv | ^blocks.1.attn.qkv -> weight lora(r=4, alpha=8.0)",
        "^blocks.0.mlp.fc1 | ^blocks.1.mlp.fc1 -> weight lora(r=2, alpha=8.0)",
        "train ^head"]


def test_load_peft_warns_about_dropout(tmp_path):
    peft_adapter(tmp_path, lora_dropout=0.1)
    with pytest.warns(UserWarning, match=r"lora_dropout=0.1 is dropped: a weight lora has no input dropout"):
        utdsl.load_peft(tiny_vit(), tmp_path)


@pytest.mark.parametrize("edit, message", [
    (dict(bias="all"), "a weight lora/dora cannot express bias='all'"),
    (dict(fan_in_fan_out=True), "a weight lora/dora cannot express fan_in_fan_out=True"),
    (dict(target_modules=["proj"]), "PEFT targets that are not nn.Linear cannot load: patch_embed.proj (Conv2d)"),
    (dict(target_modules=["nothing"]), "the adapter's target_modules ['nothing'] match no module of the model"),
    (dict(peft_type="IA3"), "is a IA3 adapter; only LORA adapters load"),
])
def test_load_peft_refusals(tmp_path, edit, message):
    peft_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(CheckpointError) as error:
        utdsl.load_peft(tiny_vit(), tmp_path)
    assert message in error.value.diagnostics[0].message


def test_load_peft_reads_no_pickle(tmp_path):
    peft_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="has no adapter_model.safetensors \\(found adapter_model.bin\\)"):
        utdsl.load_peft(tiny_vit(), tmp_path)


# --- the command ----------------------------------------------------------------------------------

MICRO = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--model-arg", "embed_dim=32",
         "--model-arg", "num_heads=2", "--model-arg", "patch_size=8", "--input-size", "16",
         "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from utdsl.cli import main

    out = tmp_path_factory.mktemp("export") / "run"
    try:
        main(["train", "lora", *MICRO, "--epochs", "1", "--batch-size", "128", "-o", "lr=3e-3",
              "--set", "r=4", "--out", str(out)])
    except SystemExit as done:
        assert not done.code
    return out


def test_export_command_merged_and_peft(run, tmp_path, cli):
    from utdsl.cli.export_cmd import load_run_model

    model, _, _ = load_run_model(run)
    x = torch.randn(2, 3, 16, 16)
    kwargs = dict(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=16, num_classes=10)
    code, out, err = cli("export", str(run), "--merged", "-o", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    assert "load with: timm.create_model('vit_tiny_patch16_224', pretrained=True, pretrained_cfg_overlay=" in out
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=True, **kwargs,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "m.safetensors"), num_classes=10))
    assert max_diff(model, plain.eval(), x) <= 1e-5
    peft = pytest.importorskip("peft")
    code, out, err = cli("export", str(run), "--format", "peft", "-o", str(tmp_path / "adapter"))
    assert code == 0, err
    base = timm.create_model("vit_tiny_patch16_224", **kwargs)  # the run's backbone, without tuners
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("tuners.")})
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert max_diff(model, loaded, x) <= 1e-5


@pytest.mark.parametrize("argv, message", [
    (["-o", "x.safetensors"], "a timm state dict has the tuners folded into the weights: pass --merged"),
    (["--merged", "--format", "peft", "-o", "d"], "a PEFT adapter keeps the tuners apart from the weights"),
    (["--format", "onnx", "-o", "d"], "unknown export format 'onnx'"),
])
def test_export_command_errors(run, cli, argv, message):
    code, _, err = cli("export", str(run), *argv)
    assert code == 2 and message in err and "Traceback" not in err
