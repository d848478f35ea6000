"""The fast path of ``parse`` (:mod:`utdsl.parse_fast`) builds exactly the AST of the reference
lark parser, spans included, or declines (None) and leaves the text to lark; it never accepts a
text lark rejects."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

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


# Equal texts at other lines and columns: the fast path reads an argument, index or chunk list once
# per distinct text (with columns relative to the text); each copy must still get its own spans.
REPEATED = [
    "a -> p t(r=1, s=x)\n  b.c -> p t(r=1, s=x)\n\td{q, v} -> p t(r=1, s=x)\ntrain e{q, v}\n  f{q, v} -> p t(r=1, s=x)",
    'a -> p t(s="x\\"y", f=1.5e3, b=true, n=.5)\n    a -> p t(s="x\\"y", f=1.5e3, b=true, n=.5)',
    "a{0, 2 of 4} -> p t\nb -> p t(n=1)\n  a {0, 2 of 4} -> p t\nb -> p t(n = 1,)\nb -> p t ( n=1 )",
    "a.b -> p t(n=1)\nlet x = 1\na.b -> p t(n=1)\nc[0:2].(d | e) -> p t(n=1)\nfreeze ^a{q}",
    "a -> p t(d=x / 2, e=-1, g=2 * -x + 1 - y)\n\t  b -> p t(d=x / 2, e=-1, g=2 * -x + 1 - y)",
    "a[0:2, 3] -> p t(d=x / 2, e=-(1), f=(2))\n  b.(c[0:2, 3] | d) -> p t(d=x / 2, e=-(1), f=(2))\nb [ 0:2] -> p t",
]


@pytest.mark.parametrize("text", REPEATED)
def test_repeated_texts_get_their_own_spans(text):
    assert_same(text)


def test_benchmark_spec_equals_the_reference():
    """The spec ``benchmarks/parse_speed.py`` times: every kind of line it writes, and the same
    argument and chunk texts on thousands of lines."""
    path = Path(__file__).parents[1] / "benchmarks" / "parse_speed.py"
    module_spec = importlib.util.spec_from_file_location("parse_speed", path)
    benchmark = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(benchmark)
    assert_same(benchmark.make_spec(2000))


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


@FUZZ_SPECS
@given(st.lists(statements, min_size=1, max_size=4), st.lists(st.sampled_from(["", " ", "\t", "    "]), min_size=1))
def test_repeated_statements_equal_the_reference(lines, indents):
    """Each statement three times, indented otherwise: what the fast path reads once and reuses
    (argument and chunk texts) must land at every copy's own lines and columns."""
    assert_same("\n".join(indents[i % len(indents)] + line for i, line in enumerate(lines * 3)))


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
