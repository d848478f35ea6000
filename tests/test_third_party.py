"""Third-party tuners: ``utdsl.register_tuner`` and a real ``utdsl.tuners`` entry point.

The fixture package ``tests/fixtures/gain_tuner`` is installed the way pip lays out an installed
distribution: the package directory plus a ``*.dist-info`` with ``METADATA`` and
``entry_points.txt``, on a directory added to ``sys.path``. ``importlib.metadata`` finds that entry
point as it finds any installed one; utdsl loads it only when a spec names the tuner.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from torch import nn

import utdsl
from utdsl import tuners
from utdsl.errors import CheckpointError, SpecError

from .conftest import tiny_vit

FIXTURE = Path(__file__).parent / "fixtures" / "gain_tuner"


def _install(root: Path, entry_point: str = "gain = utdsl_gain:GainTuner") -> None:
    shutil.copytree(FIXTURE / "utdsl_gain", root / "utdsl_gain")
    info = root / "utdsl_gain-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: utdsl-gain\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[utdsl.tuners]\n{entry_point}\n")


@pytest.fixture
def installed(tmp_path):
    """The fixture package installed on a fresh sys.path entry; everything undone afterwards."""
    def install(entry_point: str = "gain = utdsl_gain:GainTuner") -> Path:
        _install(tmp_path, entry_point)
        sys.path.insert(0, str(tmp_path))
        return tmp_path

    before = dict(tuners.REGISTRY)
    yield install
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))
    sys.modules.pop("utdsl_gain", None)
    tuners.REGISTRY.clear()
    tuners.REGISTRY.update(before)


SPEC = "blocks.*.mlp -> sequential gain(init={init})\ntrain @classifier\n"


def test_entry_point_is_listed_but_not_imported_until_a_spec_uses_it(installed):
    installed()
    assert "gain" in tuners.names()
    assert "utdsl_gain" not in sys.modules and "gain" not in tuners.REGISTRY
    spec = utdsl.compiler.parse_spec(SPEC.format(init=0.0))
    from utdsl.check import check

    checked = check(spec)
    assert "utdsl_gain" in sys.modules and tuners.get("gain").name == "gain"
    assert checked.rules[0].args.init == 0.0


def test_spec_uses_the_entry_point_tuner_like_a_built_in(installed, tmp_path):
    installed()
    base = tiny_vit()
    tuned = utdsl.compile(SPEC.format(init=0.0), base)
    from utdsl_gain import Gain

    units = [m for m in tuned.modules() if isinstance(m, Gain)]
    assert len(units) == 2                                   # one per block of the 2-block ViT
    head = sum(p.numel() for p in base.head.parameters())
    assert utdsl.trainable_parameters(tuned) == 2 * 192 + head
    x = torch.randn(2, 3, 32, 32)
    report = utdsl.verify(base, tuned, x)
    assert report.identity_expected and report.max_abs_diff == 0.0 and report.ok, report.lines()

    # the formula: y = h + g * h after each block's MLP, checked against the base blocks by hand
    with torch.no_grad():
        for unit in units:
            unit.gain.normal_()
    tuned.eval()
    expected = base.patch_embed(x)
    expected = base._pos_embed(expected)
    for block, unit in zip(base.blocks, units):
        expected = expected + block.attn(block.norm1(expected))
        h = block.mlp(block.norm2(expected))
        expected = expected + h + unit.gain * h
    expected = base.head(base.fc_norm(base.norm(expected)[:, 0]))
    assert torch.allclose(tuned(x), expected, atol=1e-5)

    # checkpoints: saved and loaded as a built-in's; other arguments are refused by name
    path = utdsl.save_tuners(tuned, tmp_path / "gain.safetensors")
    again = utdsl.compile(SPEC.format(init=0.0), base)
    utdsl.load_tuners(again, path)
    again.eval()
    assert torch.equal(again(x), tuned(x))
    other = utdsl.compile(SPEC.format(init=0.5), base)
    with pytest.raises(CheckpointError, match=r"gain: init is 0\.0 in the checkpoint, 0\.5 in this model"):
        utdsl.load_tuners(other, path)


def test_argument_errors_point_at_the_argument_with_the_closest_name(installed):
    installed()
    with pytest.raises(SpecError) as err:
            utdsl.compile("blocks.*.mlp -> sequential gain(int=0.5)", tiny_vit())
    (d,) = err.value.diagnostics
    assert d.message == "unknown argument 'int' for tuner 'gain'"
    assert (d.line, d.column) == (1, 33) and d.hint == "did you mean 'init'?"
    with pytest.raises(SpecError) as err:
        utdsl.compile("blocks.*.mlp -> parallel gain", tiny_vit())
    (d,) = err.value.diagnostics
    assert d.message == "tuner 'gain' does not accept placement 'parallel'" and d.hint == "'gain' accepts: sequential"


def test_a_misspelled_tuner_name_suggests_the_entry_point_without_loading_it(installed):
    installed()
    with pytest.raises(SpecError) as err:
        utdsl.compile("blocks.*.mlp -> sequential gian", tiny_vit())
    (d,) = err.value.diagnostics
    assert d.message == "unknown tuner 'gian'" and d.hint.startswith("did you mean 'gain'")
    assert "utdsl_gain" not in sys.modules


def test_an_entry_point_that_fails_to_import_is_a_spec_error_naming_the_package(installed):
    installed("gain = utdsl_gain_missing:GainTuner")
    with pytest.raises(SpecError, match=r"tuner 'gain' \(entry point 'gain = utdsl_gain_missing:GainTuner' of "
                                        r"package 'utdsl-gain'\) failed to load: ModuleNotFoundError"):
        utdsl.compile("blocks.*.mlp -> sequential gain", tiny_vit())


def test_an_entry_point_naming_something_else_is_refused(installed):
    installed("gain = utdsl_gain:GainArgs")
    # importing utdsl_gain registers "gain" itself, so point the name at an unrelated object instead
    installed_root = Path(sys.path[0])
    (installed_root / "utdsl_gain-0.1.0.dist-info" / "entry_points.txt").write_text(
        "[utdsl.tuners]\ngain2 = utdsl_gain:GainArgs\n")
    with pytest.raises(SpecError, match=r"names <class 'utdsl_gain.GainArgs'>, which is not a tuner called 'gain2'"):
        utdsl.compile("blocks.*.mlp -> sequential gain2", tiny_vit())


class _Args(utdsl.TunerArgs):
    dim: int = 4


class _Bottleneck(nn.Module):
    def __init__(self, args, site):
        super().__init__()
        self.down = nn.Linear(site.in_features, args.dim)
        self.up = nn.Linear(args.dim, site.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(torch.relu(self.down(x)))


@pytest.fixture
def restore_registry():
    before = dict(tuners.REGISTRY)
    yield
    tuners.REGISTRY.clear()
    tuners.REGISTRY.update(before)


def test_register_tuner_in_process(restore_registry):
    cls = utdsl.register_tuner("bneck", _Bottleneck, _Args, placements=["parallel"], identity_at_init=True)
    assert utdsl.register_tuner("bneck", _Bottleneck, _Args, placements=["parallel"]) is cls  # idempotent
    assert cls.placements == frozenset({"parallel"}) and cls.module_cls is _Bottleneck
    base = tiny_vit()
    tuned = utdsl.compile("blocks.*.mlp.fc1 -> parallel bneck(dim=3)", base)
    (insertion, _) = tuned.meta["utdsl"].plan.insertions
    assert (insertion.info.in_features, insertion.info.out_features, insertion.params) == (192, 768, 192 * 3 + 3 + 3 * 768 + 768)
    report = utdsl.verify(base, tuned, torch.randn(2, 3, 32, 32))
    assert report.ok and report.max_abs_diff == 0.0, report.lines()


def test_register_tuner_refuses_what_a_spec_could_not_use(restore_registry):
    with pytest.raises(ValueError, match="already registered"):
        utdsl.register_tuner("adapter", _Bottleneck, _Args)
    with pytest.raises(ValueError, match="is not a spec name"):
        utdsl.register_tuner("my-tuner", _Bottleneck, _Args)
    with pytest.raises(ValueError, match=r"placements of a registered module must be among \['parallel', 'sequential'\], not \['weight'\]"):
        utdsl.register_tuner("w", _Bottleneck, _Args, placements=["weight"])

    class Loose(BaseModel):
        dim: int = 4

    with pytest.raises(TypeError, match="must forbid unknown arguments"):
        utdsl.register_tuner("loose", _Bottleneck, Loose)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        utdsl.register_tuner("notmodule", object, _Args)


def test_pip_installed_package_works_from_the_command_line(tmp_path):
    """The fixture package installed by pip itself (offline, into a target directory), then used
    by name from ``utdsl compile`` in a fresh process: listed, compiled, counted."""
    import os
    import subprocess

    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--no-build-isolation", "--target", str(target), str(FIXTURE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (target / "utdsl_gain-0.1.0.dist-info" / "entry_points.txt").is_file()
    spec = tmp_path / "gain.ut"
    spec.write_text('spec gained "a per-channel gain after every MLP"\n' + SPEC.format(init=0.0))
    env = dict(os.environ, PYTHONPATH=str(target), COLUMNS="200")
    command = [sys.executable, "-m", "utdsl", "compile", str(spec), "--model", "vit_t16",
               "--model-arg", "depth=2", "--model-arg", "img_size=32", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    import json

    plan = json.loads(done.stdout)
    assert {row["tuner"] for row in plan["insertions"]} == {"gain"}
    assert len(plan["insertions"]) == 2
