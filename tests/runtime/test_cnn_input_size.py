"""``utdsl train --input-size N`` on CNNs: timm CNNs take no ``img_size``, they run at any size their
strides and pools allow; a size the model cannot take is a clear error before anything trains."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from utdsl.cli import main

SPEC = ("spec cnn \"conv-shaped LoRA on a strided conv, adapters on the last stage\"\n"
        "layer2.0.conv1 -> parallel lowrank(r=2)\n"
        "layer4.* -> sequential adapter(dim=4)\n"
        "train fc\n")
QUIET = ["--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    (root / "cnn.ut").write_text(SPEC)
    try:
        main(["train", str(root / "cnn.ut"), "--model", "resnet10t", "--data", "digits", "--input-size", "32",
              "--epochs", "1", "--batch-size", "256", "--out", str(root / "run"), "--no-progress", *QUIET])
    except SystemExit as done:
        assert not done.code
    return root / "run"


def test_train_a_cnn_at_another_input_size(run):
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["input_size"] == 32 and config["model_kwargs"] == {}  # no img_size for a CNN
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in rows if r["kind"] == "epoch"]
    assert epoch["step"] == 5 and 0.0 <= epoch["top1"] <= 100.0  # 1257 training images / 256
    tuners = load_file(str(run / "checkpoints" / "last.safetensors"))
    lowrank = {k: tuple(t.shape) for k, t in tuners.items() if "lowrank" in k}
    assert sorted(lowrank.values()) == [(2, 64, 3, 3), (128, 2, 1, 1)]  # conv-shaped: 3x3 stride 2 down, 1x1 up


def test_eval_of_a_cnn_run_reproduces_its_accuracy(run, cli):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in rows if r["kind"] == "epoch"]
    code, result, err = cli("eval", str(run), "--json", *QUIET)
    assert code == 0, err
    assert json.loads(result)["top1"] == pytest.approx(epoch["top1"])


def test_a_size_the_cnn_cannot_take_is_an_error(tmp_path, cli):
    # inception_v3 (299x299 by default) has 3x3 kernels on maps that are 1x1 at 32x32
    code, _, err = cli("train", "bitfit", "--model", "inception_v3", "--data", "digits", "--input-size", "32",
                       "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress", *QUIET)
    assert code == 2
    assert "model 'inception_v3' takes no img_size and does not run at 32x32" in err
    assert "(3, 299, 299)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
