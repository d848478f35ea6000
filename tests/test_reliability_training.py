"""Issue 11, training: a diverging run stops (or skips) and never writes a non-finite checkpoint;
Ctrl-C exits 130 with a resume line; a read-only run directory fails before the first epoch;
the backbone weights file is recorded by path and hash and checked on resume and eval."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from utdsl.cli import main

ISSUE = ["--model", "vit_t16", "--model-arg", "depth=1", "--input-size", "32", "--num-workers", "0",
         "--no-progress"]
MICRO = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--model-arg", "embed_dim=32",
         "--model-arg", "num_heads=2", "--model-arg", "patch_size=8", "--input-size", "16",
         "--num-workers", "0", "--no-progress"]
UTDSL = [sys.executable, "-m", "utdsl"]


def _finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


def test_diverging_run_stops_with_an_error_and_writes_no_checkpoint(tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli("train", "lora", *ISSUE, "--epochs", "3", "--lr", "1e9", "--out", str(out))
    assert code == 2
    assert "error: training diverged at step 3 (epoch 1): the loss is nan; the run stopped" in err
    assert "hint: lower the learning rate" in err and "Traceback" not in err
    assert not (out / "checkpoints").exists()


def test_skip_policy_skips_nonfinite_steps_and_keeps_best_finite(tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli("train", "lora", *MICRO, "--epochs", "2", "--batch-size", "256", "--lr", "1e9",
                       "-o", "nonfinite=skip", "--out", str(out))
    assert code == 0, err
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert sum(row.get("skipped_steps", 0) for row in epochs) >= 1
    for kind in ("last", "best"):
        path = out / "checkpoints" / f"{kind}.safetensors"
        assert not path.exists() or _finite(path)
    finite_epochs = [r for r in epochs if r["eval_loss"] == r["eval_loss"] and abs(r["eval_loss"]) != float("inf")]
    state = load_file(str(out / "checkpoints" / "state.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in state.values())
    if not finite_epochs:  # no evaluation was finite: nothing may be "best"
        assert not (out / "checkpoints" / "best.safetensors").exists()


def _epoch_of(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()["run.epoch"]


@pytest.fixture
def nan_second_evaluation(monkeypatch):
    """The second evaluation of a run has all-NaN logits on a split of one class: ``topk`` then
    picks a fixed class, so its top-1 could read 100 %."""
    from utdsl.runtime import fit as fit_module
    from utdsl.runtime.evaluate import EvalResult

    real, calls = fit_module.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            return EvalResult(loss=float("nan"), top1=100.0, top5=100.0, samples=360, throughput=1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "evaluate", evaluate)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_nonfinite_evaluation_never_replaces_best(tmp_path, cli, nan_second_evaluation, policy):
    out = tmp_path / "run"
    code, text, err = cli("train", "lora", *MICRO, "--epochs", "2", "--batch-size", "256",
                          "-o", f"nonfinite={policy}", "--out", str(out))
    checkpoints = out / "checkpoints"
    epochs = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if row["kind"] == "epoch"]
    assert _epoch_of(checkpoints / "best.safetensors") == "0"
    if policy == "error":
        assert code == 2
        assert ("error: epoch 2: the evaluation loss is nan (the model's outputs are not finite); nothing of "
                "this epoch was saved") in err
        assert [row["epoch"] for row in epochs] == [0] and _epoch_of(checkpoints / "last.safetensors") == "0"
    else:
        assert code == 0, err
        assert [row["epoch"] for row in epochs] == [0, 1] and epochs[1]["top1"] == 100.0
        assert _epoch_of(checkpoints / "last.safetensors") == "1"
        assert f"best {epochs[0]['top1']:.2f}% (epoch 1)" in text


def test_nonfinite_logits_never_count_as_correct():
    from utdsl.runtime.evaluate import topk_correct

    logits = torch.tensor([[float("nan")] * 3, [1.0, 2.0, float("inf")], [3.0, 2.0, 1.0]])
    assert topk_correct(logits, torch.tensor([0, 2, 0])) == [1, 1]


def test_nonfinite_tensor_in_a_checkpoint_is_refused_on_load(tmp_path):
    import utdsl
    from .conftest import tiny_vit

    model = utdsl.compile("lora", tiny_vit(depth=1), torch.zeros(1, 3, 32, 32))
    path = tmp_path / "lora.safetensors"
    utdsl.save_tuners(model, path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name][..., 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(utdsl.CheckpointError, match=f"tensor '{name}' holds inf or NaN values"):
        utdsl.load_tuners(model, path)


def _wait_for(path: Path, text: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"exited early: {process.communicate()}")
        time.sleep(0.1)
    raise AssertionError(f"no '{text}' in {path}")


def test_ctrl_c_stops_at_the_step_exits_130_and_saves_the_state(tmp_path, cli):
    import threading

    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"

    def interrupt() -> None:  # SIGINT to this process once the first step is logged
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.is_file() and '"kind": "step"' in metrics.read_text()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt, daemon=True)
    watcher.start()
    code, _, err = cli("train", "lora", *MICRO, "--epochs", "1", "--batch-size", "64", "-o", "log_every=1",
                       "--out", str(out))
    watcher.join()
    assert code == 130, err
    assert "interrupt: stopping after this step (Ctrl-C again to stop at once)" in err
    assert "error: interrupted at step " in err and f"resume with utdsl train --resume {out}" in err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 1 <= steps[-1] < 20  # 1257 / 64 -> 20 steps: it stopped inside the epoch
    assert (out / "checkpoints" / "state.safetensors").is_file()
    code, text, err = cli("train", "--resume", str(out), "--num-workers", "0", "--no-progress")
    assert code == 0, err
    assert "1 epochs, 20 steps" in text


@pytest.mark.slow  # two processes that import torch and train: about 40 s on 2 cores
def test_ctrl_c_exits_130_saves_state_and_resumes(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([*UTDSL, "train", "lora", *MICRO, "--epochs", "1", "--batch-size", "32",
                                "-o", "log_every=1", "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait_for(out / "metrics.jsonl", '"kind": "step"', process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"resume with utdsl train --resume {out}" in err and "Traceback" not in err
    state = out / "checkpoints" / "state.safetensors"
    assert state.is_file()
    done = subprocess.run([*UTDSL, "train", "--resume", str(out), "--num-workers", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 epochs, 40 steps" in done.stdout  # 1257 / 32 -> 40 steps an epoch


def test_unwritable_out_parent_fails_before_training(tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = cli("train", "lora", *MICRO, "--epochs", "1", "--out", str(blocker / "run"))
    assert code == 2
    assert f"error: cannot write the run directory '{blocker / 'run'}'" in err and "Traceback" not in err


def test_checkpoints_path_taken_by_a_file_fails_on_resume_before_training(tmp_path, cli):
    out = tmp_path / "run"
    assert cli("train", "lora", *MICRO, "--epochs", "1", "--batch-size", "256", "--out", str(out))[0] == 0
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("in the way")
    code, _, err = cli("train", "--resume", str(out), "--num-workers", "0", "--no-progress")
    assert code == 2 and f"error: cannot write the run directory '{out / 'checkpoints'}'" in err


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                               reason="drops to user nobody to meet a read-only directory (root ignores modes)")


@ROOT_ONLY
def test_read_only_run_directory_fails_before_the_first_epoch():
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="utdsl-ro-", dir="/tmp"))
    try:
        place = top / "place"
        place.mkdir()
        os.chmod(top, 0o755)
        os.chmod(place, 0o555)
        env = {**os.environ, "HOME": str(place)}
        done = subprocess.run([*AS_NOBODY, *UTDSL, "train",
                               "lora", *MICRO, "--epochs", "1", "--out", str(place / "run")],
                              capture_output=True, text=True, timeout=300, env=env, cwd=str(Path.cwd()))
    finally:
        shutil.rmtree(top)
    assert done.returncode == 2, done.stderr
    assert f"cannot write the run directory '{place / 'run'}': Permission denied ('{place}')" in done.stderr


@ROOT_ONLY
def test_read_only_checkpoints_fail_on_resume_before_training(cli):
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="utdsl-ro-", dir="/tmp"))
    try:
        run = top / "run"
        assert cli("train", "lora", *MICRO, "--epochs", "1", "--batch-size", "256", "--out", str(run))[0] == 0
        for path in (top, *top.rglob("*")):
            os.chown(path, 65534, 65534)
        os.chmod(top, 0o755)
        os.chmod(run / "checkpoints", 0o555)
        done = subprocess.run([*AS_NOBODY, *UTDSL, "train", "--resume", str(run), "--num-workers", "0",
                               "--no-progress"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HOME": str(top)}, cwd=str(Path.cwd()))
    finally:
        shutil.rmtree(top)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: cannot write the run directory '{run / 'checkpoints'}': "
                                  "Permission denied"), done.stderr


@pytest.fixture
def weights_file(tmp_path):
    import timm

    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2, patch_size=8,
                              img_size=16, num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_weights_are_recorded_by_absolute_path_and_hash(tmp_path, cli, weights_file, monkeypatch):
    import hashlib

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    code, _, err = cli("train", "lora", *MICRO, "--epochs", "1", "--batch-size", "256",
                       "--weights", "w.safetensors", "--out", str(out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["weights"] == str(weights_file.resolve())
    assert config["weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    # eval from another directory finds the same file
    monkeypatch.chdir("/")
    assert cli("eval", str(out), "--num-workers", "0", "--device", "cpu")[0] == 0
    # the file changes: eval and resume refuse, naming the flag that accepts it
    tensors = load_file(str(weights_file))
    tensors["cls_token"] = tensors["cls_token"] + 1
    save_file(tensors, str(weights_file))
    code, _, err = cli("eval", str(out), "--num-workers", "0", "--device", "cpu")
    assert code == 2 and f"the weights file '{weights_file.resolve()}' changed since the run started" in err
    assert "--accept-changed-weights" in err
    code, _, err = cli("train", "--resume", str(out), "--num-workers", "0", "--no-progress")
    assert code == 2 and "changed since the run started" in err
    code, _, err = cli("eval", str(out), "--num-workers", "0", "--device", "cpu", "--accept-changed-weights")
    assert code == 0 and "warning: the weights file" in err and "using it anyway" in err


def test_edited_config_is_refused_on_resume(tmp_path, cli):
    out = tmp_path / "run"
    assert cli("train", "lora", *MICRO, "--epochs", "2", "--batch-size", "256", "--checkpoint-every", "1",
               "--out", str(out))[0] == 0
    config = json.loads((out / "config.json").read_text())
    config["recipe"]["epochs"] = 3
    config["model_kwargs"]["drop_path_rate"] = 0.5
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = cli("train", "--resume", str(out), "--num-workers", "0", "--no-progress")
    assert code == 2 and "config.json was edited after the resume state was saved" in err


def test_huge_tuners_ask_for_yes(tmp_path, cli):
    spec = tmp_path / "big.ut"
    spec.write_text("blocks.0 -> prompt tokens(length=9000000)\n")
    code, _, err = cli("train", str(spec), *MICRO, "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 2
    assert "error: the spec's tuners have 288,000,000 parameters: about 4.3 GiB to train" in err
    assert "pass --yes" in err and not (tmp_path / "run").exists()


def test_compile_verify_asks_for_yes_before_building_huge_tuners(tmp_path, cli):
    spec = tmp_path / "big.ut"
    spec.write_text("blocks.0 -> prompt tokens(length=9000000)\n")
    code, _, err = cli("compile", str(spec), "--model", "vit_t16", "--model-arg", "depth=1", "--verify")
    assert code == 2
    assert "error: the spec's tuners have 1,728,000,000 parameters: about 6.4 GiB to build in fp32" in err
    assert "pass --yes" in err
    # without --verify nothing is allocated (the meta device) and nothing is asked
    assert cli("compile", str(spec), "--model", "vit_t16", "--model-arg", "depth=1")[0] == 0
