"""Training features of a recipe: EMA of the trained parameters, mixup/CutMix, layer-wise lr
decay, drop-path, channels-last, and the summary row (parameters, FLOPs, memory, images/s)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import utdsl
from trainkit import blobs, fast_recipe, tiny_model, trainable
from utdsl.checkpoint import read_metadata
from utdsl.runtime.ema import ParameterEMA
from utdsl.runtime.lr_decay import layer_scales
from utdsl.runtime.mixup import Mixer
from utdsl.runtime.optim import build_optimizer, set_lr
from utdsl.runtime.rundir import RunDir
from utdsl.runtime.train import fit


# EMA --------------------------------------------------------------------------------------------
def test_ema_update_warmup_and_applied_restores_exactly():
    model = nn.Linear(2, 1)
    ema = ParameterEMA(model, 0.5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # decay min(0.5, 1/10) = 0.1: shadow = 0.1 * start + 0.9 * live
    expected = start["weight"] + 0.9
    assert torch.allclose(ema.shadow["weight"], expected) and ema.updates == 1
    assert ema.current_decay() == min(0.5, 2 / 11)
    live = model.weight.detach().clone()
    with pytest.raises(RuntimeError), ema.applied():
        assert torch.equal(model.weight, ema.shadow["weight"])
        raise RuntimeError("inside")
    assert torch.equal(model.weight, live)


def _steps_of(recipe, **kwargs):
    """Trainable parameters after every optimizer step of a fit (a global post-step hook)."""
    seen = []
    hook = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs_: seen.append(trainable(model)))
    model = tiny_model()
    try:
        fit(model, blobs(48), blobs(24), recipe, **kwargs)
    finally:
        hook.remove()
    return model, seen


def test_ema_is_evaluated_and_saved_and_leaves_training_alone(tmp_path):
    raw_model, steps = _steps_of(fast_recipe(epochs=2), run=RunDir(tmp_path / "raw"))
    run = RunDir(tmp_path / "ema")
    ema_model, _ = _steps_of(fast_recipe(epochs=2, ema_decay=0.9), run=run)
    assert all(torch.equal(v, trainable(ema_model)[k]) for k, v in trainable(raw_model).items())
    shadow = {k: v.float().clone() for k, v in trainable(tiny_model()).items()}
    for n, params in enumerate(steps):
        decay = min(0.9, (1 + n) / (10 + n))
        for k in shadow:
            shadow[k].lerp_(params[k].float(), 1 - decay)
    last = load_file(str(run.checkpoint("last")))
    assert set(last) == set(shadow) and all(torch.equal(last[k], shadow[k]) for k in shadow)
    assert read_metadata(run.checkpoint("last"))["run.params"] == "ema"
    epochs = [r for r in run.read_metrics() if r["kind"] == "epoch"]
    assert [r["eval_params"] for r in epochs] == ["ema", "ema"]
    assert read_metadata(RunDir(tmp_path / "raw").checkpoint("last"))["run.params"] == "raw"


# mixup / CutMix -----------------------------------------------------------------------------------
def test_mixup_blends_the_batch_with_its_reverse():
    images, targets = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 2, 1])
    mixed = Mixer(mixup_alpha=0.4, prob=1.0)(images, targets, seed=7)
    rng = np.random.default_rng(7)
    rng.random()  # the mix_prob draw
    lam = float(rng.beta(0.4, 0.4))
    assert mixed.mode == "mixup" and mixed.lam == lam
    torch.testing.assert_close(mixed.images, lam * images + (1 - lam) * images.flip(0))
    probs = mixed.probs(3)
    assert torch.allclose(probs.sum(1), torch.ones(4))
    assert torch.allclose(probs[0], torch.tensor([lam, 1 - lam, 0.0]))  # sample 0 with sample 3 (class 1)


def test_cutmix_pastes_a_box_and_lam_is_the_uncovered_share():
    images, targets = torch.arange(2 * 8 * 8, dtype=torch.float).view(2, 1, 8, 8), torch.tensor([0, 1])
    mixed = Mixer(cutmix_alpha=1.0)(images, targets, seed=3)
    assert mixed.mode == "cutmix"
    pasted = (mixed.images[0] != images[0]).sum().item()
    assert pasted > 0 and mixed.lam == 1 - pasted / 64
    assert torch.equal(mixed.images[0][mixed.images[0] != images[0]], images[1][mixed.images[0] != images[0]])


def test_mixing_is_a_function_of_the_seed_and_mix_prob_zero_is_off():
    images, targets = torch.randn(6, 3, 8, 8), torch.arange(6) % 3
    mixer = Mixer(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    a, b = mixer(images, targets, 11), mixer(images, targets, 11)
    assert (a.mode, a.lam) == (b.mode, b.lam) and torch.equal(a.images, b.images)
    modes = {mixer(images, targets, seed).mode for seed in range(20)}
    assert modes == {"mixup", "cutmix"}
    off = Mixer(mixup_alpha=0.8, prob=0.0)(images, targets, 1)
    assert off.mode == "none" and off.images is images and off.loss_targets(3) is targets


def test_soft_targets_take_the_label_smoothing():
    logits, probs, s = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), 1), 0.1
    loss = nn.CrossEntropyLoss(label_smoothing=s)(logits, probs)
    expected = -(((1 - s) * probs + s / 5) * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(loss, expected)


def test_fit_with_mixup_and_cutmix_is_deterministic(tmp_path):
    four_d = torch.utils.data.TensorDataset(blobs(48).tensors[0].view(48, 2, 2, 2), blobs(48).tensors[1])
    recipe = fast_recipe(epochs=2, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    runs = []
    for name in ("a", "b"):
        model = tiny_model()
        fit(model, four_d, None, recipe, RunDir(tmp_path / name))
        runs.append(trainable(model))
    plain = tiny_model()
    fit(plain, four_d, None, fast_recipe(epochs=2, label_smoothing=0.1), RunDir(tmp_path / "plain"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], trainable(plain)[k]) for k in runs[0])


# layer-wise lr decay ------------------------------------------------------------------------------
def test_layer_decay_scales_blocks_tuners_tokens_and_head():
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=4)
    spec = ('spec t "ssf everywhere, shallow prompts"\n'
            "blocks.*.attn.qkv -> sequential affine()\npatch_embed -> sequential affine()\n"
            "norm -> sequential affine()\nblocks -> prompt tokens(length=2)\ntrain head\ntrain cls_token\n")
    model = utdsl.compile(spec, base, torch.zeros(2, 3, 32, 32), inplace=True)
    scales = layer_scales(model, 0.5)
    by_prefix = {}
    for name, scale in scales.items():
        by_prefix.setdefault(".".join(name.split(".")[:3]), set()).add(scale)
    assert by_prefix == {
        "head.weight": {1.0}, "head.bias": {1.0}, "cls_token": {0.125},
        "tuners.blocks.0": {0.25}, "tuners.blocks.1": {0.5},
        "tuners.patch_embed.sequential_affine": {0.125}, "tuners.norm.sequential_affine": {1.0},
        "tuners.patch_embed.norm": {0.125},  # `norm` also finds patch_embed.norm and the blocks' norms
        "tuners.blocks.prompt_tokens": {0.125},
    }
    optimizer = build_optimizer(model, fast_recipe(layer_decay=0.5, weight_decay=0.1))
    set_lr(optimizer, 0.2)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert by_param[id(param)] == (0.2 * scales[name], 0.1 if param.ndim >= 2 else 0.0)
    plain = build_optimizer(model, fast_recipe())
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0, 1.0]


@pytest.mark.parametrize("name, expected", [
    ("blocks.3.attn.qkv.bias", 4), ("tuners.blocks.3.mlp.fc1.parallel_adapter.units.full.up.weight", 4),
    ("tuners.blocks.prompt_tokens.units.full.tokens", 0), ("cls_token", 0), ("pos_embed", 0),
    ("patch_embed.proj.weight", 0), ("norm_pre.weight", 0), ("tuners.shared.fact_tt_10.FacTu", 13),
    ("norm.weight", 13), ("head.weight", 13), ("conv1.weight", 0), ("fc.weight", 13),
    ("layers.2.blocks.1.attn.qkv.weight", 3),  # Swin: stage-level ids
])
def test_layer_ids_of_a_twelve_block_model(name, expected):
    from utdsl.runtime.lr_decay import layer_id

    assert layer_id(name, 12) == expected


def test_resnet_stages_are_its_blocks():
    from utdsl.runtime.lr_decay import layer_id, num_blocks

    model = timm.create_model("resnet10t", num_classes=3)
    assert num_blocks(model) == 4  # layer1..layer4
    assert [layer_id(n, 4, first=1) for n in ("conv1.0.weight", "layer1.0.conv1.weight", "layer4.0.bn2.bias",
                                               "fc.bias")] == [0, 1, 4, 5]


# drop-path ------------------------------------------------------------------------------------------
def _vit(rate: float):
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=4, drop_path_rate=rate)
    return utdsl.compile("lora", base, torch.zeros(2, 3, 32, 32), inplace=True)


def test_drop_path_changes_the_train_graph_only():
    plain, dropped = _vit(0.0), _vit(0.2)

    def bernoulli(graph):
        return [n.args[1] for n in graph.nodes if n.op == "call_method" and n.target == "bernoulli_"]
    assert bernoulli(dropped.graph_for(True)) == [pytest.approx(0.8)] * 2  # rates 0, 0.2 over 2 blocks: block 1's two
    assert bernoulli(dropped.graph_for(False)) == [] and bernoulli(plain.graph_for(True)) == []
    def ops(model):  # the eval graph's operations; nn.Identity stands where DropPath is off
        return [(n.op, str(n.target)) for n in model.graph_for(False).nodes
                if not (n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.Identity))]
    assert ops(dropped) == ops(plain)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropped.eval()(x), plain.eval()(x))
        torch.manual_seed(1)
        a = dropped.train()(x)
        torch.manual_seed(1)
        b = plain.train()(x)
    assert not torch.equal(a, b)


def test_drop_path_rate_reaches_the_backbone_of_a_run(tmp_path):
    from utdsl.errors import ModelError
    from utdsl.runtime.config import build_model, resolve_config
    from utdsl.runtime.droppath import drop_path_kwargs
    from utdsl.runtime.recipes import Recipe

    config = resolve_config(spec="lora", model="vit_tiny_patch16_224", data="digits", data_root=None,
                            recipe=Recipe(drop_path_rate=0.2, input_size=32), model_kwargs={"depth": 2})
    model = build_model(config, echo=lambda text: None)
    assert [n.args[1] for n in model.graph_for(True).nodes if n.target == "bernoulli_"] == [pytest.approx(0.8)] * 2
    with pytest.raises(ModelError, match="set twice"):
        drop_path_kwargs("vit_tiny_patch16_224", 0.1, {"drop_path_rate": 0.2})
    with pytest.raises(ModelError, match="takes no drop_path_rate"):
        drop_path_kwargs("inception_v3", 0.1)


# channels-last --------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.conv(x).relu().flatten(1))


def test_channels_last_model_and_batches(tmp_path):
    images = torch.randn(24, 3, 4, 4)
    data = torch.utils.data.TensorDataset(images, torch.arange(24) % 3)
    results = {}
    for name, on in (("plain", False), ("cl", True)):
        torch.manual_seed(0)
        model = utdsl.compile('spec c "c"\nconv -> parallel lowrank(r=2)\ntrain head\n', TinyCNN(),
                              torch.zeros(2, 3, 4, 4), inplace=True)
        formats = []
        model.conv.register_forward_pre_hook(
            lambda module, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                                and not args[0].is_contiguous()))
        fit(model, data, data, fast_recipe(epochs=1, channels_last=on), RunDir(tmp_path / name))
        results[name] = trainable(model)
        assert set(formats) == {on}  # training and evaluation batches
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last) == on
    for key in results["plain"]:
        torch.testing.assert_close(results["cl"][key], results["plain"][key], rtol=1e-4, atol=1e-5)


# the summary row -------------------------------------------------------------------------------------
def test_summary_row_reports_parameters_flops_memory_and_speed(tmp_path):
    run = RunDir(tmp_path)
    fit(tiny_model(), blobs(48), blobs(24), fast_recipe(epochs=2), run)
    summary = run.read_metrics()[-1]
    assert summary["kind"] == "summary" and (summary["step"], summary["epoch"]) == (12, 2)
    # fc1 8->16 and head 16->3 with biases; LoRA r=2: down 8->2, up 2->16
    assert (summary["trainable_params"], summary["total_params"]) == (3 * 16 + 3 + 2 * 8 + 16 * 2, 243)
    assert summary["forward_flops"] == 2 * (8 * 16 + 16 * 3 + 8 * 2 + 2 * 16)
    assert summary["peak_memory_source"] == "process_max_rss" and summary["peak_memory_mb"] > 10
    assert summary["activation_memory_mb"] > 0 and summary["eval_params"] == "raw"
    assert summary["train_throughput"] > 0 and summary["eval_throughput"] > 0
    again = fit(tiny_model(), blobs(48), blobs(24), fast_recipe(epochs=2), run, resume=True)
    assert again.state.step == 12 and [r["kind"] for r in run.read_metrics()].count("summary") == 1
