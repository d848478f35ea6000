"""``--compile``: training and evaluation through torch.compile keep the model's own names in
every checkpoint, resume, and a backend that fails stops with a clear error."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from trainkit import blobs, fast_recipe, tiny_model
from utdsl.errors import ModelError
from utdsl.runtime import compiled as compiled_module
from utdsl.runtime.compiled import CompiledModel
from utdsl.runtime.rundir import RunDir
from utdsl.runtime.train import fit


def test_a_failing_backend_is_a_model_error(monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compiled_module.torch, "compile", functools.partial(torch.compile, backend=broken))
    torch._dynamo.reset()
    model = CompiledModel(tiny_model())
    with pytest.raises(ModelError, match="torch.compile failed") as caught:
        model(torch.randn(2, 8))
    assert "without --compile" in caught.value.diagnostics[0].hint
    torch._dynamo.reset()


def test_wrapper_passes_attributes_and_modes_through():
    model = tiny_model()
    wrapped = CompiledModel(model)
    wrapped.eval()
    assert not model.training and wrapped.meta is model.meta    # GraphModule attributes reach through
    wrapped.train()
    assert model.training


@pytest.mark.slow
def test_compiled_training_resumes_with_the_models_names(tmp_path):
    torch._dynamo.reset()
    recipe = fast_recipe(epochs=2, log_every=3)
    train, test = blobs(32), blobs(16, seed=0)
    plain_run = RunDir(tmp_path / "plain")
    fit(tiny_model(), train, test, recipe, plain_run)
    run = RunDir(tmp_path / "compiled")
    stopped = fit(tiny_model(), train, test, recipe, run, compiled=True, stop_after_steps=5, checkpoint_every=1)
    assert stopped.stopped
    resumed = fit(tiny_model(tuner_seed=7), train, test, recipe, run, resume=True, compiled=True)
    assert resumed.state.step == 8 and resumed.last_eval is not None
    for kind in ("last", "best"):
        names = set(load_file(str(run.checkpoint(kind))))
        assert names == set(load_file(str(plain_run.checkpoint(kind)))) and not any("_orig_mod" in n for n in names)
    state = set(load_file(str(run.state_path)))
    assert not any("_orig_mod" in n or "compiled." in n for n in state)
