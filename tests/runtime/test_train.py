"""The training loop, schedule, optimizer, sampler, evaluation and recipes on a tiny model."""

from __future__ import annotations

import math
import random

import pytest
import torch
from safetensors.torch import load_file

from trainkit import blobs, fast_recipe, frozen, tiny_model, trainable
from utdsl.runtime.distributed import EpochSampler, SeededDataset, mix_seed
from utdsl.runtime.evaluate import evaluate, topk_correct
from utdsl.runtime.optim import build_optimizer, lr_at
from utdsl.errors import UtdslError
from utdsl.runtime.recipes import Recipe, RecipeError, load_recipe, recipe_names
from utdsl.values import parse_assignments
from utdsl.runtime.rundir import RunDir
from utdsl.runtime.train import fit


# schedule and optimizer -----------------------------------------------------------------------
def test_lr_warmup_then_cosine():
    recipe = Recipe(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    steps = [lr_at(s, recipe, steps_per_epoch=2) for s in range(20)]
    assert steps[:4] == [0.25, 0.5, 0.75, 1.0]
    assert steps[4] == 1.0
    assert steps[19] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 15 / 16)))
    assert all(a >= b for a, b in zip(steps[4:], steps[5:]))
    assert lr_at(20, recipe, 2) == pytest.approx(0.1)


def test_weight_decay_skips_1d_unless_asked():
    model = tiny_model()
    groups = build_optimizer(model, fast_recipe(weight_decay=0.5)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    assert len(build_optimizer(model, fast_recipe(decay_1d=True)).param_groups) == 1
    assert isinstance(build_optimizer(model, fast_recipe(optimizer="sgd")), torch.optim.SGD)


# sampler and seeded data ----------------------------------------------------------------------
def test_sampler_order_depends_on_seed_and_epoch_only():
    a = EpochSampler(10, seed=3, epoch=1).indices()
    assert a == EpochSampler(10, seed=3, epoch=1).indices() and sorted(a) == list(range(10))
    assert a != EpochSampler(10, seed=3, epoch=2).indices() != EpochSampler(10, seed=4, epoch=1).indices()
    assert EpochSampler(10, seed=3, epoch=1, start=4).indices() == a[4:]
    assert list(EpochSampler(3, shuffle=False, epoch=7)) == [(7, 0), (7, 1), (7, 2)]


def test_sampler_shards_pad_and_cover():
    shards = [EpochSampler(10, seed=1, rank=r, world_size=4).indices() for r in range(4)]
    assert [len(s) for s in shards] == [3, 3, 3, 3]
    assert set(sum(shards, [])) == set(range(10))
    unpadded = [EpochSampler(10, shuffle=False, rank=r, world_size=4, pad=False).indices() for r in range(4)]
    assert sorted(sum(unpadded, [])) == list(range(10))


def test_seeded_dataset_is_deterministic_and_leaves_caller_rng_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1).item() + random.random()

    data = SeededDataset(Noisy(), seed=5)
    torch.manual_seed(0)
    random.seed(0)
    first = data[(2, 1)]
    expected_torch, expected_py = torch.rand(1), random.random()
    torch.manual_seed(0)
    random.seed(0)
    assert data[(2, 1)] == first and data[(3, 1)] != first and data[(2, 2)] != first
    assert torch.equal(torch.rand(1), expected_torch) and random.random() == expected_py
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(1, 2) < 2**63


# evaluation -------------------------------------------------------------------------------------
def test_topk_correct_counts():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0], [0.0, 0, 9, 0, 0, 0, 0]])
    assert topk_correct(logits, torch.tensor([6, 6, 2])) == [2, 2]
    assert topk_correct(logits, torch.tensor([2, 2, 0])) == [0, 2]
    assert topk_correct(logits[:, :3], torch.tensor([0, 2, 1])) == [0, 3]  # top-5 of 3 classes


def test_evaluate_exact_accuracy():
    class Lookup(torch.nn.Module):  # ranks classes by distance to the first feature, ties broken
        def forward(self, x):
            classes = torch.arange(6.0)
            return -((classes - x[:, :1]).abs() + 0.01 * classes)

    x = torch.tensor([[0.0], [1], [2], [3], [4], [5], [0], [1]])
    y = torch.tensor([0, 1, 2, 3, 4, 5, 5, 5])
    result = evaluate(Lookup(), torch.utils.data.TensorDataset(x, y), batch_size=3, precision="fp32")
    assert (result.samples, result.top1) == (8, 75.0)
    assert result.top5 == 75.0  # the last two targets rank 6th


# the loop ----------------------------------------------------------------------------------------
def test_fit_learns_trains_only_tuners_and_writes_the_run(tmp_path):
    model = tiny_model()
    before_frozen, before_trained = frozen(model), trainable(model)
    run = RunDir(tmp_path / "run")
    run.write_config({"test": True})
    result = fit(model, blobs(48), blobs(24, seed=0), fast_recipe(epochs=4, label_smoothing=0.1), run,
                 metadata={"who": "test"})
    assert result.state.epoch == 4 and result.state.step == 4 * 6 and not result.stopped
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in before_frozen.items())
    assert all(not torch.equal(v, dict(model.named_parameters())[k]) for k, v in before_trained.items())
    rows = run.read_metrics()
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]
    assert {"step", "epoch", "loss", "lr", "top1", "top5", "throughput"} <= set(epochs[0])
    assert len([r for r in rows if r["kind"] == "step"]) == 24
    assert epochs[-1]["top1"] == 100.0 and epochs[-1]["loss"] < epochs[0]["loss"]
    last = load_file(str(run.checkpoint("last")))
    assert set(last) == set(before_trained)
    assert all(torch.equal(last[k], v) for k, v in trainable(model).items())
    assert run.checkpoint("best").is_file() and run.state_path.is_file()
    assert result.state.best_top1 == max(r["top1"] for r in epochs)


def test_fit_is_deterministic_per_seed(tmp_path):
    def run_once(name, seed):
        model = tiny_model(seed=0)
        fit(model, blobs(40), None, fast_recipe(seed=seed, epochs=2), RunDir(tmp_path / name))
        return trainable(model)

    a, b, c = run_once("a", 0), run_once("b", 0), run_once("c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_grad_accumulation_matches_a_larger_batch(tmp_path):
    results = []
    for name, batch, accum in (("big", 16, 1), ("accum", 8, 2)):
        model = tiny_model(dropout=0.0)
        fit(model, blobs(48), None, fast_recipe(batch_size=batch, grad_accum=accum, epochs=2),
            RunDir(tmp_path / name))
        results.append(trainable(model))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)


def test_uneven_last_accumulation_group(tmp_path):
    model = tiny_model()
    result = fit(model, blobs(40), None, fast_recipe(batch_size=8, grad_accum=3, epochs=1), RunDir(tmp_path))
    assert result.state.step == 2  # 5 batches: a group of 3, then one of 2


# recipes -------------------------------------------------------------------------------------------
def test_shipped_recipes_load():
    assert {"default", "vpt_fgvc", "noah_vtab", "cifar100"} <= set(recipe_names())
    vpt = load_recipe("vpt_fgvc")
    assert (vpt.optimizer, vpt.batch_size, vpt.epochs, vpt.warmup_epochs) == ("sgd", 64, 100, 10)
    noah = load_recipe("noah_vtab")
    assert (noah.optimizer, noah.lr, noah.weight_decay, noah.train_split) == ("adamw", 1e-3, 1e-4, "train800val200")


def test_recipe_overrides_are_converted_and_checked(tmp_path):
    recipe = load_recipe("vpt_fgvc", {"lr": "0.5", "epochs": "5", "betas": "0.8, 0.9", "clip-grad": "1"})
    assert (recipe.lr, recipe.epochs, recipe.betas, recipe.clip_grad) == (0.5, 5, (0.8, 0.9), 1.0)
    with pytest.raises(RecipeError) as error:
        load_recipe("default", {"lrr": "1"})
    assert error.value.diagnostics[0].message == "unknown recipe field 'lrr'"
    assert "'lr'" in error.value.diagnostics[0].hint
    with pytest.raises(RecipeError, match="epochs: Input should be a valid integer"):
        load_recipe("default", {"epochs": "many"})
    with pytest.raises(RecipeError, match="min_lr"):
        load_recipe("default", {"min_lr": "1"})
    with pytest.raises(RecipeError, match="unknown recipe 'vpt'") as error:
        load_recipe("vpt")
    assert "vpt_fgvc" in error.value.diagnostics[0].hint
    bad = tmp_path / "mine.toml"
    bad.write_text('lr = 0.1\nwarmup = 3\n')
    with pytest.raises(RecipeError, match="warmup: unknown field") as error:
        load_recipe(str(bad))
    assert "warmup_epochs" in error.value.diagnostics[0].hint
    assert parse_assignments(["lr=0.1", " epochs = 3"]) == {"lr": "0.1", "epochs": "3"}
    with pytest.raises(UtdslError, match="override 'lr' is not of the form name=value"):
        parse_assignments(["lr"])


def test_progress_bars_on_request_and_off_in_ci(tmp_path, monkeypatch, capsys):
    from utdsl.runtime.train import progress_enabled

    monkeypatch.setenv("CI", "1")
    assert progress_enabled() is False and progress_enabled(True) is True
    fit(tiny_model(), blobs(16), None, fast_recipe(epochs=1), RunDir(tmp_path), progress=True)
    assert "epoch 1" in capsys.readouterr().err
