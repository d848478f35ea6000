"""The fast path of ``parse`` (:mod:`utdsl.parse_fast`) builds exactly the AST of the reference
lark parser, spans included, or declines (None) and leaves the text to lark; it never accepts a
text lark rejects."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from utdsl.errors import Source, SpecError
from utdsl.library import library_specs
from utdsl.parse import _parse_with_lark, parse
from utdsl.parse_fast import parse_statements

from .test_fuzz import FUZZ, FUZZ_SPECS, TOKENS, noisy, statements


def both(text: str):
    """(fast path's statements or None, lark's statements or None when lark rejects the text)."""
    source = Source(text, "t.ut")
    try:
        reference = _parse_with_lark(text, source)
    except SpecError:
        reference = None
    return parse_statements(text, source), reference


def assert_same(text: str, *, fast_required: bool = True) -> None:
    fast, reference = both(text)
    if reference is None:
        assert fast is None, f"the fast path accepts what lark rejects: {text!r}"
        return
    if fast is None:
        assert not fast_required, f"the fast path declined a valid spec: {text!r}"
        return
    for mine, theirs in zip(fast, reference):
        assert mine == theirs, f"{text!r}:\n fast {mine}\n lark {theirs}"
    assert len(fast) == len(reference)


TRICKY = [
    "",
    "\n\n  # only comments\n\t\n",
    "let r = (8)",
    "let a = -(1 + 2) * (3) - --4 / ((5))",
    "let f = .5 + 2. * 1e3 - 1.e-5 + 3E+2",
    'let s = "a \\"quoted\\" \\\\ \\n \\t \\x é 😀"',
    "let t = true\nlet u = false\nlet v = trueish\nlet w = let",
    "x.y[0:2, 3, :, :4, 5:].(a | b.c)(n1 ..< n2) -> parallel lowrank(r=(r), alpha=2 , )",
    "^a{q, v} | @classifier.bias{0, 1 of 4} -> prompt tokens",
    "@classifier -> parallel lowrank()",
    "@head.(a | b[1]).**{of} -> weight lora",
    "blocks.*(norm2 .. drop_path2) -> parallel adapter(dim=8)",
    "blocks.0(1..2) -> sequential adapter",
    "blocks.(a | (b | c.d)).e -> parallel lowrank",
    "  blocks . * . mlp  ->  parallel  lowrank ( r = 8 ,\n   # note\n   alpha = 16 ,\n )  # trailing",
    "a[\n0:2,\n 3\n] -> parallel lowrank",
    "a{\nq,\n v  # c\n} -> parallel lowrank",
    "train **.bias\nfreeze blocks[0:2].**\ntrain ^norm\nfreeze @classifier",
    'use "x.ut"\nuse "sub/dir y.ut"',
    "tuner t = vera(r = 1,\n  # c\n  b = 2)\nattn.qkv -> weight t",
    'spec x "d\\"q"\nspec y',
    "let r = 8\r\nattn -> parallel lowrank(r=r)\r\n",
    "\tlet r = 8\t# tab\n\n\n  let a = r",
    "use.x -> parallel lowrank\ntrue.false -> parallel lowrank",
    "blocks.spec.let.of.true -> parallel let(use=spec)",
    "a -> p t(x=1)\n# end",
    "a -> p t(x=1)\n",
    "a->p t",
    "blocks[007] -> p t(n=007)",
    "blocks[0:2]{q} -> parallel lowrank(r=-(-(-(1))))",
]

DECLINED_BUT_VALID = [
    "attn.qkv{0, 1 of4} -> parallel lowrank",  # `of` glued to its count
]

INVALID = [
    "attn.qkv parallel lowrank", "let r = 2 ** 3", "let r = 10**30", "blocks..attn -> p t",
    "blocks.0[1] -> p t", "a -> p t(,)", "a -> p t(r=1,,)", "a[0,] -> p t", "a[] -> p t",
    "@c(a .. b) -> p t", "train.x", "letr = 8", "a -> p t\rb -> p t", "a -> p t b -> p t",
    "a{q of} -> p t", "a(x .. < y) -> p t", "a -> p t(r=8 alpha=1)", "spec", "use x",
    "(a) -> p t(", "a -> p t)", "a.(b .. c) -> p t", "\ufefflet r = 1", "let r = 1 -> 2",
    "a -> p t(r=(1)", "*[0] -> p t", "blocks.ümlaut -> p t", "let r = 1.5.5",
]


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_specs_equal_the_reference(text):
    assert_same(text)


@pytest.mark.parametrize("text", DECLINED_BUT_VALID)
def test_unusual_valid_specs_go_to_lark(text):
    fast, reference = both(text)
    assert fast is None and reference is not None
    assert parse(text).statements == reference


def test_problems_found_while_building_are_lark_s():
    text = "let n = " + "1" * 5000
    assert parse_statements(text, Source(text)) is None
    with pytest.raises(SpecError, match="1:9: error: integer literal is too long"):
        parse(text)


@pytest.mark.parametrize("text", INVALID)
def test_invalid_specs_are_declined(text):
    fast, reference = both(text)
    assert fast is None and reference is None


def test_library_specs_equal_the_reference():
    for path in library_specs():
        assert_same(path.read_text(encoding="utf-8"))


def test_generated_large_spec_equals_the_reference():
    rnd = random.Random(0)
    lines = ['spec big "generated"', "let r = 8", "let alpha = 2 * r"]
    sites = ["attn.qkv{q, v}", "attn.proj", "mlp.fc1{0, 2 of 4}", "(attn | mlp).fc1", "norm1"]
    for i in range(400):
        lines.append(f"stage{i % 3}.blocks[{i % 5}:{i % 7 + 5}].{rnd.choice(sites)} -> parallel "
                     f"lowrank(r={rnd.choice(['r', '4', '2 * r'])}, alpha=alpha)  # rule {i}")
        lines.append(rnd.choice([f"train blocks.{i}.**.bias", f"freeze ^stage{i}.norm", ""]))
    assert_same("\n".join(lines))


@FUZZ_SPECS
@given(st.lists(statements, max_size=6), st.data())
def test_generated_specs_equal_the_reference(lines, data):
    assert_same("\n".join(lines))
    assert_same("# a spec\n\n" + "\n\n".join(noisy(line, data.draw) for line in lines) + "\n")


@FUZZ
@given(st.lists(st.sampled_from(TOKENS + ["@c", "..", "..<", "tuner", "="]), max_size=30),
       st.lists(st.sampled_from(["", " ", "\n"])))
def test_token_soups_equal_the_reference_or_are_declined(tokens, separators):
    separators = separators or [" "]
    assert_same("".join(t + separators[i % len(separators)] for i, t in enumerate(tokens)), fast_required=False)


@FUZZ
@given(st.text(alphabet=st.sampled_from("ab01 .*^|()[]{}:,=-+/\"'#\n\t\\->_xqv@<"), max_size=60))
def test_spec_characters_equal_the_reference_or_are_declined(text):
    assert_same(text, fast_required=False)
