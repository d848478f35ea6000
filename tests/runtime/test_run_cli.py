"""``utdsl train``/``eval``/``plot`` end to end on digits with a micro ViT, and their errors:
exit code 2 and a message, no traceback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from utdsl.cli import main

MICRO = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--model-arg", "embed_dim=32",
         "--model-arg", "num_heads=2", "--model-arg", "patch_size=8", "--input-size", "16",
         "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    try:
        main(["train", "lora", *MICRO, "--data", "digits", "--epochs", "2", "--batch-size", "128",
              "-o", "lr=3e-3", "--set", "r=4", "--out", str(out)])
    except SystemExit as done:
        assert not done.code
    return out


def test_train_writes_a_complete_run(trained):
    config = json.loads((trained / "config.json").read_text())
    assert (config["spec"], config["model"], config["data"], config["num_classes"]) == (
        "lora", "vit_tiny_patch16_224", "digits", 10)
    assert config["spec_overrides"] == {"r": "4"} and config["recipe"]["lr"] == 3e-3
    assert config["model_kwargs"] == {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
    assert config["recipe"]["input_size"] == 16  # img_size=16 is passed to the ViT from the recipe
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and epochs[-1]["step"] == 20  # 1257 / 128 -> 10 a epoch
    assert {"top1", "top5", "loss", "lr", "throughput", "step"} <= set(epochs[-1])
    tuners = load_file(str(trained / "checkpoints" / "last.safetensors"))
    assert set(tuners) >= {"head.weight", "head.bias"} and len(tuners) == 6  # q and v: down, up
    assert all(t.shape[0] == 4 or t.shape[1] == 4 for k, t in tuners.items() if "lowrank" in k)


def test_eval_reproduces_the_runs_accuracy(trained, cli):
    code, out, err = cli("eval", str(trained), "--json", "--num-workers", "0", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in rows if r["kind"] == "epoch"), key=lambda r: r["top1"])
    assert result["split"] == "test" and result["samples"] == 360
    assert result["top1"] == pytest.approx(best["top1"]) and result["checkpoint"].endswith("best.safetensors")
    code, out, _ = cli("eval", str(trained / "checkpoints" / "last.safetensors"), "--split", "val",
                       "--num-workers", "0")
    assert code == 0 and "digits [val]" in out and "180" in out


def test_plot_draws_a_png(trained, cli):
    code, out, _ = cli("plot", str(trained))
    assert code == 0 and (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_of_a_finished_run_changes_nothing(trained, cli):
    before = load_file(str(trained / "checkpoints" / "last.safetensors"))
    code, out, err = cli("train", "--resume", str(trained), "--num-workers", "0", "--no-progress")
    assert code == 0, err
    assert "2 epochs, 20 steps" in out
    after = load_file(str(trained / "checkpoints" / "last.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("argv, message", [
    (["train", "lora", "-o", "lrr=1"], "unknown recipe field 'lrr'"),
    (["train", "lora", "--epochs", "0"], "epochs: Input should be greater than 0"),
    (["train", "lora", "--recipe", "vtab"], "unknown recipe 'vtab'"),
    (["train", "lora", "--data", "nope"], "nope"),
    (["train", "nospec"], "nospec"),
    (["train"], "give a SPEC to train, or --resume RUN"),
    (["train", "--resume", "RUN", "--lr", "0.1"], "drop recipe overrides"),
    (["train", "--resume", "/nonexistent/run"], "is not a run directory"),
    (["eval", "/nonexistent/x.safetensors"], "not found"),
    (["plot", "/nonexistent/run"], "has no metrics.jsonl"),
])
def test_errors_exit_2_without_traceback(cli, argv, message):
    code, out, err = cli(*argv)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_train_refuses_an_existing_run(trained, cli):
    code, _, err = cli("train", "lora", *MICRO, "--out", str(trained))
    assert code == 2 and "already holds a run" in err and "--resume" in err


def test_eval_of_a_plain_checkpoint_says_what_is_missing(tmp_path, cli):
    import utdsl
    from utdsl.runtime.models import create_model

    model = utdsl.compile("lora", create_model("vit_tiny_patch16_224", depth=1, img_size=32), model_name="t")
    path = utdsl.save_tuners(model, tmp_path / "plain.safetensors")
    code, _, err = cli("eval", str(path))
    assert code == 2 and "not written by `utdsl train`" in err


def test_a_spec_that_does_not_fit_leaves_no_run(tmp_path, cli):
    spec = tmp_path / "bad.ut"
    spec.write_text('spec bad "no such module"\nblocks.*.atn -> parallel lowrank(r=2)\n')
    code, _, err = cli("train", str(spec), *MICRO, "--out", str(tmp_path / "run"))
    assert code == 2 and "atn" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_eval_on_data_with_other_classes_is_an_error(trained, tmp_path, cli):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b", "c"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(tmp_path / split / label / "0.png")
    code, _, err = cli("eval", str(trained), "--data", "folder", "--data-root", str(tmp_path),
                       "--num-workers", "0")
    assert code == 2 and "has 3 classes; the checkpoint's head has 10" in err
