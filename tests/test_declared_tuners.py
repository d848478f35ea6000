"""Declared tuners: ``tuner NAME = TUNER(ARGS)`` names a configuration once; every rule naming it
shares the tuner's shared state (VeRA's projections, FacT's factors), built from all their sites,
counted once and saved once. Misuse is an error at the offending text."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import utdsl
from utdsl.errors import SpecError

from .conftest import tiny_vit
from .test_weight_placement import X, perturb

ACROSS_RULES = """\
tuner factors = fact_tt(r=8, scale=2)
attn.qkv{q, k, v} | attn.proj -> weight factors
mlp.fc1 | mlp.fc2 -> weight factors
"""


def test_rules_naming_one_declaration_share_its_state(tmp_path):
    tuned = utdsl.compile(ACROSS_RULES, tiny_vit(), X)
    plan = tuned.meta["utdsl"].plan
    shared = sorted(n for n, _ in tuned.named_parameters() if ".shared." in n)
    assert shared == ["tuners.shared.fact_tt_factors.FacTu", "tuners.shared.fact_tt_factors.FacTv"]
    assert plan.shared_params == 2 * 8 * 192
    # per-site cores: q, k, v, proj (8x8 each), fc1 (32x8), fc2 (8x32), in 2 blocks
    assert plan.tuner_params == 2 * 8 * 192 + 2 * (4 * 64 + 2 * 256)
    assert utdsl.trainable_parameters(tuned) == plan.tuner_params
    # the same as one rule over every site: the declaration is what groups them, not the line
    one_rule = "attn.qkv{q, k, v} | attn.proj | mlp.fc1 | mlp.fc2 -> weight fact_tt(r=8, scale=2)"
    assert utdsl.compile(one_rule, tiny_vit(), X).meta["utdsl"].plan.tuner_params == plan.tuner_params
    undeclared = ACROSS_RULES.replace("tuner factors = fact_tt(r=8, scale=2)\n", "").replace(
        "factors", "fact_tt(r=8, scale=2)")
    assert utdsl.compile(undeclared, tiny_vit(), X).meta["utdsl"].plan.shared_params == 2 * 2 * 8 * 192
    perturb(tuned)
    path = utdsl.save_tuners(tuned, tmp_path / "fact.safetensors")
    assert sum(".shared." in k for k in load_file(str(path))) == 2
    again = utdsl.compile(ACROSS_RULES, tiny_vit(), X)
    utdsl.load_tuners(again, path)
    assert torch.equal(again(X), tuned(X))
    units = [tuned.get_submodule(i.module_name).units for i in plan.insertions]
    factors = {id(unit._shared) for joint_units in units for unit in joint_units.values()}
    assert len(factors) == 1


def test_veras_projections_are_sized_for_every_site_of_the_declaration():
    spec = "tuner proj = vera(r=16)\nattn.qkv{q, v} -> weight proj\nmlp.fc1 | mlp.fc2 -> weight proj"
    tuned = utdsl.compile(spec, tiny_vit(), X)
    buffers = dict(tuned.named_buffers())
    # fc1 has 768 outputs and fc2 768 inputs: the one A and B cover the widest site of both rules
    assert buffers["tuners.shared.vera_proj.vera_A"].shape == (16, 768)
    assert buffers["tuners.shared.vera_proj.vera_B"].shape == (768, 16)


@pytest.mark.parametrize("spec, message", [
    ("tuner vera = vera(r=2)\nattn.qkv -> weight vera",
     "<string>:1:7: error: 'vera' is the name of a tuner; a declaration needs a name of its own"),
    ("tuner p = vera(r=2)\ntuner p = lora\nattn.qkv -> weight p",
     "<string>:2:7: error: tuner 'p' is declared twice"),
    ("tuner p = vera(r=2)\nattn.qkv -> weight p(r=3)",
     "<string>:2:20: error: 'p' is a declared tuner; its arguments are given where it is declared (line 1)"),
    ("tuner proj = vera(r=2)\nattn.qkv -> weight prj",
     "<string>:2:20: error: unknown tuner 'prj'"),
    ("tuner p = vera(rr=2)\nattn.qkv -> weight p",
     "<string>:1:16: error: unknown argument 'rr' for tuner 'vera'"),
    ("tuner p = vera(r=2)\nattn.qkv -> parallel p",
     "<string>:2:13: error: tuner 'vera' does not accept placement 'parallel'"),
    ("attn.qkv -> weight p\ntuner p = vera(r=2)",
     "<string>:1:20: error: unknown tuner 'p'"),
])
def test_misused_declarations_are_errors_at_the_text(spec, message):
    with pytest.raises(SpecError) as caught:
        utdsl.compile(spec, tiny_vit(), X)
    assert str(caught.value).startswith(message)


def test_an_unknown_name_hints_at_the_declared_ones():
    with pytest.raises(SpecError, match="hint: did you mean 'proj'"):
        utdsl.compile("tuner proj = vera(r=2)\nattn.qkv -> weight prj", tiny_vit(), X)
