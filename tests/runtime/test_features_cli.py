"""``utdsl train`` with every training feature on (EMA, mixup, CutMix, drop-path, layer decay,
channels-last, a memory cache), and ``utdsl eval`` of its EMA checkpoint."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from utdsl.cli import main

MICRO = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=2", "--model-arg", "embed_dim=32",
         "--model-arg", "num_heads=2", "--model-arg", "patch_size=8", "--input-size", "16",
         "--num-workers", "0", "--no-progress", "--device", "cpu"]
FEATURES = ["--ema-decay", "0.9", "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.1",
            "--layer-decay", "0.75", "--channels-last", "--data-cache", "memory", "--label-smoothing", "0.1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "run"
    try:
        main(["train", "lora", *MICRO, *FEATURES, "--data", "digits", "--epochs", "1", "--batch-size", "256",
              "-o", "lr=3e-3", "-o", "mix_prob=0.9", "--out", str(out)])
    except SystemExit as done:
        assert not done.code
    return out


def test_flags_become_recipe_fields_and_the_run_reports_its_costs(run):
    recipe = json.loads((run / "config.json").read_text())["recipe"]
    assert {k: recipe[k] for k in ("ema_decay", "mixup_alpha", "cutmix_alpha", "drop_path_rate", "layer_decay",
                                   "channels_last", "data_cache", "mix_prob")} == {
        "ema_decay": 0.9, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "drop_path_rate": 0.1, "layer_decay": 0.75,
        "channels_last": True, "data_cache": "memory", "mix_prob": 0.9}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in rows if r["kind"] == "epoch"]
    assert epoch["eval_params"] == "ema" and epoch["step"] == 5  # 1257 / 256
    summary = rows[-1]
    assert summary["kind"] == "summary" and summary["eval_params"] == "ema"
    assert summary["trainable_params"] == 10 * 32 + 10 + 2 * 2 * (32 * 8 + 8 * 32)  # head; LoRA r=8 on q, v
    assert summary["forward_flops"] > 2 * summary["total_params"] and summary["train_throughput"] > 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("epoch/top1")] == [pytest.approx(epoch["top1"])]


def test_eval_uses_the_ema_checkpoint_in_either_memory_format(run, cli):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in rows if r["kind"] == "epoch"]
    code, out, err = cli("eval", str(run), "--json", "--num-workers", "0", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    assert (result["params"], result["channels_last"]) == ("ema", True)
    assert result["top1"] == pytest.approx(epoch["top1"]) and result["loss"] == pytest.approx(epoch["eval_loss"])
    code, out, err = cli("eval", str(run), "--num-workers", "0", "--device", "cpu", "--no-channels-last",
                         "--data-cache", "memory")
    assert code == 0, err
    assert "digits [test] (EMA of the parameters)" in out and f"{epoch['top1']:.2f}" in out


@pytest.mark.parametrize("argv, message", [
    (["--log-to", "wandbx"], "unknown logging backend 'wandbx'"),
    (["--data-cache", "gpu"], "data_cache: Input should be 'off', 'memory' or 'device'"),
    (["--ema-decay", "1.5"], "ema_decay: Input should be less than 1"),
    (["--drop-path", "0.1", "--model-arg", "drop_path_rate=0.2"], "the drop-path rate is set twice"),
])
def test_feature_flag_errors_exit_2(tmp_path, cli, argv, message):
    code, _, err = cli("train", "lora", *MICRO, "--data", "digits", "--epochs", "1", *argv, "--out", str(tmp_path / "r"))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
