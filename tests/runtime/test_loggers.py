"""Where a run's metrics go: metrics.jsonl, TensorBoard event files (read back with TensorBoard's
own reader), and W&B / MLflow through the same interface when their packages are there."""

from __future__ import annotations

import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainkit import blobs, fast_recipe, tiny_model
from utdsl.runtime.loggers import LoggerError, check_backends, open_loggers, scalars
from utdsl.runtime.rundir import RunDir
from utdsl.runtime.train import fit


def _events(run: RunDir) -> EventAccumulator:
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    return events


def _series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_holds_the_metrics_of_the_run(tmp_path):
    run = RunDir(tmp_path)
    fit(tiny_model(), blobs(48), blobs(24), fast_recipe(epochs=2, log_every=2), run)
    rows = run.read_metrics()
    events = _events(run)
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/lr", "epoch/top1", "epoch/eval_loss", "summary/forward_flops"} <= tags
    for kind, field in (("step", "loss"), ("epoch", "top1"), ("epoch", "loss"), ("summary", "trainable_params")):
        expected = [(r["step"], pytest.approx(r[field], rel=1e-6)) for r in rows if r["kind"] == kind]
        assert _series(events, f"{kind}/{field}") == expected
    assert "summary/peak_memory_source" not in tags  # text fields stay in metrics.jsonl


def test_a_resumed_run_purges_the_events_after_its_state(tmp_path):
    recipe = fast_recipe(epochs=2, log_every=1)
    whole, part = RunDir(tmp_path / "whole"), RunDir(tmp_path / "part")
    fit(tiny_model(), blobs(32), blobs(8), recipe, whole)
    fit(tiny_model(), blobs(32), blobs(8), recipe, part, stop_after_steps=6)  # state saved at step 4
    fit(tiny_model(), blobs(32), blobs(8), recipe, part, resume=True)
    for tag in ("step/loss", "epoch/top1"):
        expected = _series(_events(whole), tag)
        assert [s for s, _ in _series(_events(part), tag)] == [s for s, _ in expected] == sorted({s for s, _ in expected})
        assert _series(_events(part), tag) == expected


def test_scalars_are_the_numeric_fields_by_kind():
    row = {"kind": "epoch", "step": 4, "top1": 50.0, "epoch": 1, "eval_params": "ema", "best": True}
    assert scalars(row) == {"epoch/top1": 50.0, "epoch/epoch": 1.0}


def test_wandb_and_mlflow_get_the_rows_when_installed(tmp_path, monkeypatch):
    calls = []
    handle = types.SimpleNamespace(log=lambda values, step: calls.append(("wandb.log", values, step)),
                                   finish=lambda: calls.append(("wandb.finish",)))
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: calls.append(("wandb.init", kwargs["name"], kwargs["config"])) or handle
    mlflow = types.ModuleType("mlflow")
    mlflow.start_run = lambda run_name: calls.append(("mlflow.start_run", run_name))
    mlflow.log_params = lambda params: calls.append(("mlflow.log_params", params))
    mlflow.log_metrics = lambda values, step: calls.append(("mlflow.log_metrics", values, step))
    mlflow.end_run = lambda: calls.append(("mlflow.end_run",))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    run = RunDir(tmp_path / "run")
    run.write_config({"model": "tiny", "recipe": {"lr": 0.1}, "spec_text": "long"})
    with open_loggers(run, ["wandb", "mlflow", "tensorboard", "wandb"], config=run.read_config()) as logger:
        logger.log({"kind": "epoch", "step": 3, "top1": 75.0, "eval_params": "raw"})
    assert calls == [
        ("wandb.init", "run", {"model": "tiny", "recipe": {"lr": 0.1}, "spec_text": "long"}),
        ("mlflow.start_run", "run"), ("mlflow.log_params", {"model": "tiny", "recipe.lr": 0.1}),
        ("wandb.log", {"epoch/top1": 75.0}, 3), ("mlflow.log_metrics", {"epoch.top1": 75.0}, 3),
        ("wandb.finish",), ("mlflow.end_run",)]
    assert [r["top1"] for r in run.read_metrics()] == [75.0]


def test_backends_unknown_or_not_installed_are_logger_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # an import of it fails, as when not installed
    with pytest.raises(LoggerError, match="logging backend 'mlflow' needs the 'mlflow' package") as error:
        check_backends(["mlflow"])
    assert error.value.diagnostics[0].hint == "pip install mlflow"
    with pytest.raises(LoggerError, match="unknown logging backend 'wandbb'") as error:
        check_backends(["wandbb"])
    assert "wandb" in error.value.diagnostics[0].hint
    assert check_backends(["jsonl", " TensorBoard ", ""]) == []
