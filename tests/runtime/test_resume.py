"""Resume is exact: a run stopped anywhere and resumed ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trainkit import Tiny, blobs, fast_recipe, tiny_model, trainable
from utdsl.errors import CheckpointError
from utdsl.runtime.rundir import RunDir, TrainState, atomic_write
from utdsl.runtime.train import fit


def _without_timing(rows):  # and without the process's peak memory, which differs between processes
    return [{k: v for k, v in r.items() if "throughput" not in k and k != "peak_memory_mb"} for r in rows]


def _optimizer_state(run: RunDir):
    return {k: v for k, v in load_file(str(run.state_path)).items() if k.startswith("optim.")}


@pytest.mark.parametrize("optimizer, accum, every, stop", [
    ("adamw", 1, 0, 7),   # killed one step into epoch 2 (6 steps an epoch): resumes at epoch 2's start
    ("sgd", 2, 2, 8),     # mid-epoch state every 2 steps, killed at step 8 right after saving it
    ("adamw", 2, 2, 9),   # killed one step after a mid-epoch save: that step is done again
])
def test_resume_is_bitwise_exact(tmp_path, optimizer, accum, every, stop):
    recipe = fast_recipe(optimizer=optimizer, grad_accum=accum, epochs=3, log_every=3)
    train, test = blobs(48), blobs(24, seed=0)

    whole = tiny_model()
    whole_run = RunDir(tmp_path / "whole")
    fit(whole, train, test, recipe, whole_run, checkpoint_every=every)

    part_run = RunDir(tmp_path / "part")
    stopped = fit(tiny_model(), train, test, recipe, part_run, checkpoint_every=every, stop_after_steps=stop)
    assert stopped.stopped and stopped.state.step == stop
    resumed_model = tiny_model(tuner_seed=123)  # other tuners: the state must overwrite them
    resumed = fit(resumed_model, train, test, recipe, part_run, resume=True, checkpoint_every=every)

    assert resumed.state.step == 3 * 6 // accum and not resumed.stopped
    expected, got = trainable(whole), trainable(resumed_model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    a, b = _optimizer_state(whole_run), _optimizer_state(part_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _without_timing(part_run.read_metrics()) == _without_timing(whole_run.read_metrics())
    for kind in ("last", "best"):
        x, y = load_file(str(whole_run.checkpoint(kind))), load_file(str(part_run.checkpoint(kind)))
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_resume_with_ema_mixup_and_cutmix_is_bitwise_exact(tmp_path):
    recipe = fast_recipe(epochs=3, log_every=3, ema_decay=0.9, mixup_alpha=0.8, cutmix_alpha=1.0,
                         label_smoothing=0.1, layer_decay=0.7)
    points, labels = blobs(48).tensors
    train = torch.utils.data.TensorDataset(points.view(48, 2, 2, 2), labels)  # images for CutMix
    test = torch.utils.data.TensorDataset(blobs(24).tensors[0].view(24, 2, 2, 2), blobs(24).tensors[1])
    whole = tiny_model()
    whole_run = RunDir(tmp_path / "whole")
    fit(whole, train, test, recipe, whole_run, checkpoint_every=2)
    part_run = RunDir(tmp_path / "part")
    fit(tiny_model(), train, test, recipe, part_run, checkpoint_every=2, stop_after_steps=9)  # state at 8
    resumed_model = tiny_model(tuner_seed=123)
    fit(resumed_model, train, test, recipe, part_run, resume=True, checkpoint_every=2)

    assert all(torch.equal(v, trainable(resumed_model)[k]) for k, v in trainable(whole).items())
    a, b = load_file(str(whole_run.state_path)), load_file(str(part_run.state_path))
    assert {k.split(".")[0] for k in a} == {"param", "optim", "ema"}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _without_timing(part_run.read_metrics()) == _without_timing(whole_run.read_metrics())
    for kind in ("last", "best"):
        x, y = load_file(str(whole_run.checkpoint(kind))), load_file(str(part_run.checkpoint(kind)))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        assert all(torch.equal(x[k], a[f"ema.{k}"]) for k in x) if kind == "last" else True
    with pytest.raises(CheckpointError, match="holds no EMA of the parameters"):
        plain = RunDir(tmp_path / "plain")
        fit(tiny_model(), train, None, fast_recipe(epochs=1, log_every=3), plain)
        fit(tiny_model(), train, None, fast_recipe(epochs=1, log_every=3, ema_decay=0.9), plain, resume=True)


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    run = RunDir(tmp_path)
    model = tiny_model()
    fit(model, blobs(16), None, fast_recipe(epochs=1), run)
    again_model = tiny_model(tuner_seed=5)
    again = fit(again_model, blobs(16), None, fast_recipe(epochs=1), run, resume=True)
    assert (again.state.epoch, again.state.step) == (1, 2)
    assert all(torch.equal(v, trainable(again_model)[k]) for k, v in trainable(model).items())


def test_resume_without_state_starts_over(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"kind": "step", "step": 1, "epoch": 0, "loss": 9.0})
    result = fit(tiny_model(), blobs(16), None, fast_recipe(epochs=1, log_every=100), run, resume=True)
    assert result.state.step == 2 and run.read_metrics()[0]["kind"] == "epoch"


def test_resume_with_another_recipe_is_an_error(tmp_path):
    run = RunDir(tmp_path)
    fit(tiny_model(), blobs(16), None, fast_recipe(epochs=1), run)
    with pytest.raises(CheckpointError, match="schedule"):
        fit(tiny_model(), blobs(16), None, fast_recipe(epochs=2), run, resume=True)


def test_resume_into_another_model_is_an_error(tmp_path):
    run = RunDir(tmp_path)
    fit(tiny_model(), blobs(16), None, fast_recipe(epochs=1), run)
    with pytest.raises(CheckpointError, match="'head.weight' has shape \\(3, 16\\), the model's is \\(4, 16\\)"):
        fit(tiny_model(classes=4), blobs(16, classes=4), None, fast_recipe(epochs=1), run, resume=True)
    with pytest.raises(CheckpointError, match="trainable parameters differ"):
        fit(Tiny(), blobs(16), None, fast_recipe(epochs=1), run, resume=True)


def test_corrupt_state_is_an_error(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoints.mkdir(parents=True)
    run.state_path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable resume state"):
        fit(tiny_model(), blobs(16), None, fast_recipe(epochs=1), run, resume=True)


def test_state_holds_no_pickle_and_names_its_parts(tmp_path):
    run = RunDir(tmp_path)
    fit(tiny_model(), blobs(16), None, fast_recipe(epochs=1), run)
    from safetensors import safe_open

    with safe_open(str(run.state_path), "pt") as handle:
        meta, keys = handle.metadata(), set(handle.keys())
    assert meta["format"] == "utdsl-train-state/1"
    assert json.loads(meta["loop"])["step"] == 2 and json.loads(meta["loop"])["epoch"] == 1
    assert {k.split(".")[0] for k in keys} == {"param", "optim"}
    assert {k.rsplit(".", 1)[1] for k in keys if k.startswith("optim.")} == {"step", "exp_avg", "exp_avg_sq"}


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write(target, lambda tmp: open(tmp, "w").write("old"))

    def broken(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_truncate_metrics_drops_lines_after_the_state(tmp_path):
    run = RunDir(tmp_path)
    rows = [{"kind": "step", "step": s, "epoch": s // 3} for s in range(1, 8)]
    rows.insert(3, {"kind": "epoch", "epoch": 0, "step": 3})
    rows.insert(7, {"kind": "epoch", "epoch": 1, "step": 6})
    for row in rows:
        run.append_metrics(row)
    with open(run.metrics_path, "a") as handle:
        handle.write('{"kind": "step", "st')  # a line cut by a kill
    run.truncate_metrics(TrainState(epoch=1, batch=1, step=4))
    assert run.read_metrics() == rows[:5]
