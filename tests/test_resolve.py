"""Stage resolve: selector matching, precedence, no-match errors naming the closest real paths."""

from __future__ import annotations

import pytest

import utdsl
from utdsl.check import check
from utdsl.resolve import resolve

from .conftest import meta_model

PATHS = ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.11.attn.qkv", "blocks.3.mlp.fc1",
         "norm", "layers.1.downsample.norm", "head", "blocks.2.attn"]


def selected(selector: str) -> list[str]:
    from utdsl.selectors import matches

    rule = utdsl.parse_spec(f"train {selector}").param_rules[0]
    return [p for p in PATHS if matches(rule.selector, p)]


@pytest.mark.parametrize("selector, expected", [
    ("attn.qkv", ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.11.attn.qkv"]),
    ("qkv", ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.11.attn.qkv"]),
    ("tn.qkv", []),                                         # suffixes match whole segments only
    ("norm", ["norm", "layers.1.downsample.norm"]),
    ("^norm", ["norm"]),
    ("blocks[0:2].attn.qkv", ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]),
    ("blocks[11].attn.qkv", ["blocks.11.attn.qkv"]),
    ("blocks[1:].attn.qkv", ["blocks.1.attn.qkv", "blocks.11.attn.qkv"]),
    ("blocks.*.attn", ["blocks.2.attn"]),
    ("^blocks.*", []),                                     # * is exactly one segment
    ("^blocks.**.qkv", ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.11.attn.qkv"]),
    ("blocks.*.(attn | mlp.fc1)", ["blocks.3.mlp.fc1", "blocks.2.attn"]),
    ("head | ^norm", ["norm", "head"]),
])
def test_selector_matching(selector, expected):
    assert selected(selector) == expected


@pytest.fixture(scope="module")
def vit_b16():
    return meta_model()


def test_a_rule_matching_nothing_names_the_three_closest_paths(vit_b16):
    text = "spec s\nlet r = 4\nattn.qvk -> parallel lowrank(r=r)\n"
    with pytest.raises(utdsl.SpecError) as caught:
        resolve(check(utdsl.parse_spec(text, "s.ut")), vit_b16)
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.line, diagnostic.column) == (3, 1)
    assert diagnostic.message == "selector 'attn.qvk' matches no module of the model"
    assert diagnostic.hint.startswith("closest real paths: attn.qkv (e.g. blocks.0.attn.qkv)")
    assert diagnostic.hint.count("e.g.") == 3
    rendered = str(caught.value)
    assert rendered.startswith("s.ut:3:1: error: selector 'attn.qvk' matches no module")
    assert "\n    attn.qvk -> parallel lowrank(r=r)\n    ^" in rendered


def test_every_unmatched_selector_is_reported_at_once(vit_b16):
    text = "train hed\nblocks.*.atn -> parallel adapter(dim=2)\nfreeze **.bais\n"
    with pytest.raises(utdsl.SpecError) as caught:
        resolve(check(utdsl.parse_spec(text)), vit_b16)
    assert [(d.line, d.column) for d in caught.value.diagnostics] == [(1, 7), (2, 1), (3, 8)]


def test_a_later_rule_with_the_same_placement_and_tuner_shadows_and_warns(vit_b16):
    text = "attn.qkv -> parallel lowrank(r=4)\nblocks[0].attn.qkv -> parallel lowrank(r=16)\n"
    bindings = resolve(check(utdsl.parse_spec(text)), vit_b16)
    ranks = {b.path: b.rule.args.r for b in bindings.bindings}
    assert ranks["blocks.0.attn.qkv"] == 16 and ranks["blocks.1.attn.qkv"] == 4
    assert len(bindings.bindings) == 12
    (warning,) = bindings.warnings
    assert warning.line == 2 and "shadows the rule at line 1" in warning.message


def test_train_and_freeze_apply_in_order_last_wins(vit_b16):
    text = "train blocks[0:2]\nfreeze blocks.1.**.bias\ntrain head\n"
    trained = set(resolve(check(utdsl.parse_spec(text)), vit_b16).trained)
    assert "blocks.0.attn.qkv.bias" in trained and "blocks.1.attn.qkv.weight" in trained
    assert "blocks.1.attn.qkv.bias" not in trained and "blocks.2.attn.qkv.weight" not in trained
    assert {"head.weight", "head.bias"} <= trained
