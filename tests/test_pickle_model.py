"""A compiled model can be saved whole (``torch.save``, pickle): both mode graphs, ``gm.meta`` and
the tuners come back, and the copy computes what the original does in either mode."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

import utdsl
from utdsl.modes import ModalGraphModule
from utdsl.verify import compiled_info

from .conftest import tiny_vit


def torch_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def pickle_round_trip(model):
    return pickle.loads(pickle.dumps(model))


def perturbed(model):
    """Tuners moved off their identity init, so a lost or mis-wired tuner shows in the output."""
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def outputs(model, images, mode):
    model.train(mode)
    torch.manual_seed(7)
    return model(images)


@pytest.mark.parametrize("round_trip", [torch_round_trip, pickle_round_trip])
@pytest.mark.parametrize("spec, drop_path", [("lora", 0.0), ("vpt_deep", 0.0), ("prefix", 0.0), ("ssf", 0.0),
                                             ("lora", 0.1)])
def test_round_trip_keeps_both_modes(spec, drop_path, round_trip, images):
    model = perturbed(utdsl.compile(spec, tiny_vit(drop_path_rate=drop_path)))
    copy = round_trip(model)
    assert isinstance(copy, ModalGraphModule)
    assert copy.has_mode_graphs == model.has_mode_graphs == (drop_path > 0)
    assert compiled_info(copy).plan.insertions == compiled_info(model).plan.insertions
    assert copy.state_dict().keys() == model.state_dict().keys()
    for mode in (False, True, False):  # .eval()/.train() switch graphs on the copy too
        torch.testing.assert_close(outputs(copy, images, mode), outputs(model, images, mode), rtol=0, atol=0)
        assert copy.graph is copy.graph_for(mode)
    if drop_path:
        assert not torch.equal(outputs(copy, images, True), outputs(copy, images, False))


def test_a_loaded_model_saves_merges_and_pickles_again(tmp_path, images):
    model = perturbed(utdsl.compile("lora", tiny_vit(drop_path_rate=0.1))).eval()
    copy = pickle_round_trip(torch_round_trip(model)).eval()
    torch.testing.assert_close(utdsl.merge(copy)(images), model(images), rtol=0, atol=1e-5)
    path = utdsl.save_tuners(copy, tmp_path / "lora.safetensors")
    fresh = utdsl.compile("lora", tiny_vit(drop_path_rate=0.1)).eval()
    utdsl.load_tuners(fresh, path)
    torch.testing.assert_close(fresh(images), model(images), rtol=0, atol=0)


def test_loading_leaves_tracing_working():
    # fx re-traces the stored code; a bad fx.wrap registration there used to break every later trace
    pickle_round_trip(utdsl.compile("lora", tiny_vit()))
    utdsl.compile("lora", tiny_vit())
