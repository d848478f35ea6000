"""check: parsed spec -> checked spec. Tables of specs with the values they check to, or with
every error they give (exact line and column, message and hint fragments)."""

from __future__ import annotations

import os

import pytest

from utdsl.check import check
from utdsl.errors import SpecError
from utdsl.parse import parse
from utdsl.syntax import Freeze, Literal, Rule, Train
from utdsl.tuners.adapter import AdapterArgs
from utdsl.tuners.lowrank import LowRankArgs


def checked(text: str, overrides=None, path: str = "<string>", **kwargs):
    return check(parse(text, path), overrides, **kwargs)


def errors(text: str, overrides=None, path: str = "<string>", **kwargs):
    with pytest.raises(SpecError) as info:
        checked(text, overrides, path, **kwargs)
    return info.value.diagnostics


# ---- values ----------------------------------------------------------------------------------

BINDINGS = [
    ("let r = 8", {"r": 8}),
    ("let r = 8\nlet alpha = 2 * r", {"r": 8, "alpha": 16}),
    ("let d = 768 / 12", {"d": 64}),                   # exact integer division stays an int
    ("let d = 1 / 4", {"d": 0.25}),
    ("let d = 7.0 / 2", {"d": 3.5}),
    ("let x = 1 + 2 * 3 - 4", {"x": 3}),
    ("let x = (1 + 2) * 3", {"x": 9}),
    ("let x = -2 * -3", {"x": 6}),
    ("let x = 1e-3 * 2", {"x": 2e-3}),
    ("let a = gelu", {"a": "gelu"}),                   # an unbound bare name is a string
    ('let a = "gelu"', {"a": "gelu"}),
    ("let a = true\nlet b = false", {"a": True, "b": False}),
    ("let r = 8\nlet s = r", {"r": 8, "s": 8}),
    ("let r = r", {"r": "r"}),
]


@pytest.mark.parametrize("text, expected", BINDINGS)
def test_bindings(text, expected):
    spec = checked(text)
    assert spec.bindings == expected
    assert {k: type(v) for k, v in spec.bindings.items()} == {k: type(v) for k, v in expected.items()}


def test_rules_get_validated_args_and_literal_values():
    spec = checked('''spec lora "LoRA on q and v"
let r = 8
let alpha = 2 * r
attn.qkv{q, v} -> parallel lowrank(r=r, alpha=alpha)
blocks.*.mlp -> sequential adapter(dim=8, activation=gelu, scale="learned")
train head
freeze blocks[0:2].**
''')
    assert (spec.name, spec.description) == ("lora", "LoRA on q and v")
    assert [type(s) for s in spec.statements] == [Rule, Rule, Train, Freeze]
    lora, adapter = spec.rules
    assert lora.args == LowRankArgs(r=8, alpha=16.0)
    assert adapter.args == AdapterArgs(dim=8, activation="gelu", scale="learned")
    r, alpha = lora.tuner.args
    assert (r.value, alpha.value) == (Literal(8, r.value.span), Literal(16, alpha.value.span))
    assert lora.origin == "<string>"
    assert spec.bindings == {"r": 8, "alpha": 16}


def test_check_of_a_checked_spec_changes_nothing():
    spec = checked("let r = 4\na -> parallel lowrank(r=r, alpha=r * 2)\ntrain head")
    again = check(spec)
    assert again.statements == spec.statements
    assert [r.args for r in again.rules] == [r.args for r in spec.rules]


def test_tuner_without_arguments_gets_defaults():
    (rule,) = checked("a -> parallel lowrank").rules
    assert rule.args == LowRankArgs()


# ---- errors ----------------------------------------------------------------------------------

# text -> [(line, column, message fragment, hint fragment or None)], every diagnostic, in order
ERRORS = [
    # tuners and placements
    ("a -> parallel lowrnk(r=8)", [(1, 15, "unknown tuner 'lowrnk'", "did you mean 'lowrank'")]),
    ("a -> parallel lora(r=8)", [(1, 6, "tuner 'lora' does not accept placement 'parallel'", "'lora' accepts: weight")]),
    ("a -> parallel zzz", [(1, 15, "unknown tuner 'zzz'", "tuners: adapter, affine, ")]),
    ("a -> paralel lowrank", [(1, 6, "unknown placement 'paralel'", "did you mean 'parallel'")]),
    ("a -> zzz lowrank",
     [(1, 6, "unknown placement 'zzz'", "placements: parallel, sequential, prompt, prefix")]),
    ("a -> sequential lowrank(r=8)",
     [(1, 6, "tuner 'lowrank' does not accept placement 'sequential'", "'lowrank' accepts: parallel")]),
    ("a -> parallel affine()",
     [(1, 6, "tuner 'affine' does not accept placement 'parallel'", "'affine' accepts: sequential")]),
    # arguments: unknown (at the name), bad values (at the value), model-level (at the call)
    ("a -> parallel lowrank(rank=8)",
     [(1, 23, "unknown argument 'rank' for tuner 'lowrank'", "did you mean 'r'?")]),
    ("a -> parallel lowrank(zzz=8)",
     [(1, 23, "unknown argument 'zzz' for tuner 'lowrank'", "'lowrank' takes: r, alpha, dropout, init")]),
    ("a -> parallel lowrank(r=0)", [(1, 25, "bad value for 'r': Input should be greater than 0", "rank")]),
    ("a -> parallel lowrank(r=2.5)", [(1, 25, "bad value for 'r': Input should be a valid integer", None)]),
    ("a -> parallel lowrank(init=xavier)",
     [(1, 28, "bad value for 'init': Input should be 'kaiming' or 'gaussian'", None)]),
    ("a -> parallel adapter(scale=big)", [(1, 29, "bad value for 'scale': ", "output scale")]),
    ("a -> parallel lowrank(r=1, r=2)",
     [(1, 28, "argument 'r' is given twice", "first given at line 1, column 23")]),
    ("a -> sequential affine(scale=false, shift=false)",
     [(1, 17, "affine needs scale=true or shift=true", None)]),
    ("a -> parallel lowrank(rank=8, r=-1, dropout=2)",
     [(1, 23, "unknown argument 'rank'", None), (1, 33, "bad value for 'r'", None),
      (1, 45, "bad value for 'dropout'", None)]),
    # lets
    ("let r = 8\nlet r = 9", [(2, 1, "'r' is bound twice", "first bound at line 1")]),
    ("let x = foo + 1", [(1, 9, "'foo' is not bound", "must be a 'let' binding")]),
    ("let rank = 2\nlet x = -rnk", [(2, 10, "'rnk' is not bound", "did you mean 'rank'?")]),
    ("let x = 1 / 0", [(1, 13, "division by zero", None)]),
    ("let x = 1 / (2 - 2.0)", [(1, 14, "division by zero", None)]),
    ('let x = "a" + 1', [(1, 9, "'+' needs numbers, not a string ('a')", None)]),
    ("let x = 2 * true", [(1, 13, "'*' needs numbers, not a boolean (True)", None)]),
    ('let x = -"a"', [(1, 10, "'-' needs numbers, not a string", None)]),
    ('let s = "a"\nlet x = s * s', [(2, 9, "'*' needs numbers", None), (2, 13, "'*' needs numbers", None)]),
    ("let x = 1" + "0" * 400 + " * 1.5", [(1, 9, "number out of range", None)]),
    # an error is reported once, not again where the broken value is used
    ("let x = 1 / 0\nlet y = x + 1\na -> parallel lowrank(r=x)", [(1, 13, "division by zero", None)]),
    # selectors
    ("train blocks[5:2]", [(1, 14, "empty index range [5:2]", "selects a, a+1, ..., b-1")]),
    ("train blocks[3:3, 1:2]", [(1, 14, "empty index range [3:3]", None)]),
    ("a{0, 4 of 4} -> parallel lowrank", [(1, 2, "chunk 4 is out of range: 4 chunks are 0 to 3", None)]),
    ("a{q, 1 of 4} -> parallel lowrank", [(1, 2, "q, k and v are chunks of 3, not of 4", "q, k, v")]),
    ("a{q, q} -> parallel lowrank", [(1, 2, "duplicate chunk: 'q' is listed twice", None)]),
    ("a{v, 2 of 3} -> parallel lowrank", [(1, 2, "duplicate chunk: '2' and 'v' are the same chunk", None)]),
    ("a{x} -> parallel lowrank", [(1, 2, "unknown chunk 'x'", "{0, 2 of 4}")]),
    ("a{0, 2} -> parallel lowrank", [(1, 2, "chunk indices need a count of at least 1", None)]),
    ("a{0 of 0} -> parallel lowrank", [(1, 2, "chunk indices need a count of at least 1", None)]),
    ("train x.(a[2:1] | b)", [(1, 12, "empty index range [2:1]", None)]),
    # the header
    ('let r = 1\nspec s "d"', [(2, 1, "the 'spec' header must be the first statement", None)]),
    ('spec s "d"\nspec t "e"', [(2, 1, "'spec' header appears twice", "the first one is at line 1")]),
    # every error of a spec at once
    ("let r = 1\nlet r = 2\na -> paralel lowrnk(r=0)\ntrain b[2:1]",
     [(2, 1, "'r' is bound twice", None), (3, 6, "unknown placement", None),
      (3, 14, "unknown tuner 'lowrnk'", None), (4, 9, "empty index range", None)]),
]


@pytest.mark.parametrize("text, expected", ERRORS)
def test_errors(text, expected):
    diagnostics = errors(text)
    assert len(diagnostics) == len(expected), [d.message for d in diagnostics]
    for diagnostic, (line, column, message, hint) in zip(diagnostics, expected):
        assert (diagnostic.line, diagnostic.column) == (line, column)
        assert message in diagnostic.message
        if hint is not None:
            assert hint in diagnostic.hint
        assert diagnostic.span.source.path == "<string>"


def test_missing_required_argument_points_at_the_call(monkeypatch):
    from pydantic import Field

    from utdsl import tuners
    from utdsl.tuners.base import Tuner, TunerArgs

    class NeedsDimArgs(TunerArgs):
        dim: int = Field(gt=0)

    class NeedsDim(Tuner):
        name, Args, placements = "needsdim", NeedsDimArgs, frozenset({"parallel"})

    monkeypatch.setitem(tuners.REGISTRY, "needsdim", NeedsDim)
    (diagnostic,) = errors("train x\na -> parallel needsdim(\n  )")
    assert (diagnostic.line, diagnostic.column, diagnostic.message) == (
        2, 15, "tuner 'needsdim' needs the argument 'dim'")
    assert (diagnostic.span.end_line, diagnostic.span.end_column) == (3, 4)
    assert checked("a -> parallel needsdim(dim=3)").rules[0].args == NeedsDimArgs(dim=3)


def test_error_rendering_points_at_the_value():
    with pytest.raises(SpecError) as info:
        checked("let r = 8\nattn.qkv -> parallel lowrank(r=r, dropout=1.5)", path="specs/x.ut")
    assert str(info.value) == (
        "specs/x.ut:2:43: error: bad value for 'dropout': Input should be less than 1\n"
        "    attn.qkv -> parallel lowrank(r=r, dropout=1.5)\n"
        "                                              ^^^\n"
        "  hint: dropout on the input of A")


# ---- overrides -------------------------------------------------------------------------------

OVERRIDES = [
    ({"r": "16"}, {"r": 16, "alpha": 32}),
    ({"r": "-2"}, {"r": -2, "alpha": -4}),
    ({"alpha": "1.5"}, {"r": 8, "alpha": 1.5}),
    ({"alpha": "1e-2"}, {"r": 8, "alpha": 0.01}),
    ({"r": "true"}, None),  # a bool: 2 * true is an error
    ({"act": "relu"}, {"r": 8, "alpha": 16}),
]


@pytest.mark.parametrize("overrides, expected", OVERRIDES)
def test_overrides(overrides, expected):
    text = "let r = 8\nlet alpha = 2 * r\nlet act = gelu\na -> parallel adapter(activation=act)"
    if expected is None:
        assert "'*' needs numbers, not a boolean" in errors(text, overrides)[0].message
        return
    spec = checked(text, overrides)
    assert {k: spec.bindings[k] for k in expected} == expected
    assert spec.rules[0].args.activation == overrides.get("act", "gelu")


@pytest.mark.parametrize("overrides, message, hint", [
    ({"rank": "4"}, "--set rank=4: the spec has no 'let rank'", "did you mean 'r'?"),
    ({"zzz": "4"}, "--set zzz=4: the spec has no 'let zzz'", "the spec's lets are: r, alpha"),
])
def test_override_of_no_let_is_an_error(overrides, message, hint):
    (diagnostic,) = errors("let r = 8\nlet alpha = 2 * r", overrides)
    assert (diagnostic.span, diagnostic.message, diagnostic.hint) == (None, message, hint)


def test_override_of_a_spec_without_lets():
    (diagnostic,) = errors("train head", {"r": "4"})
    assert diagnostic.hint == "the spec has no 'let' bindings"


# ---- use -------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path, monkeypatch):
    """Write {name: text} under tmp_path; returns a function giving the path of the main spec."""
    monkeypatch.chdir(tmp_path)

    def write(**texts):
        for name, text in texts.items():
            (tmp_path / f"{name}.ut").parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / f"{name}.ut").write_text(text)
        return str(tmp_path / "main.ut")
    return write


def check_file(path, overrides=None, **kwargs):
    with open(path) as f:
        return check(parse(f.read(), path), overrides, **kwargs)


def test_use_splices_statements_in_place(files, tmp_path):
    main = files(main='spec main "m"\ntrain head\nuse "part.ut"\nfreeze x',
                 part='spec part "ignored"\nlet d = 4\na -> parallel adapter(dim=d)\ntrain b')
    spec = check_file(main)
    assert [str(s.selector) for s in spec.statements] == ["head", "a", "b", "x"]
    assert (spec.name, spec.description) == ("main", "m")
    assert spec.rules[0].origin == str(tmp_path / "part.ut")
    assert spec.rules[0].args.dim == 4
    assert spec.bindings == {"d": 4}


@pytest.mark.parametrize("reference", ["part", "part.ut", "./part.ut", "./part"])
def test_use_finds_files_next_to_the_user(files, reference):
    main = files(main=f'use "{reference}"', part="a -> parallel lowrank")
    assert len(check_file(main).rules) == 1


def test_use_from_text_is_relative_to_the_working_directory(files):
    files(part="a -> parallel lowrank")
    assert len(checked('use "part"').rules) == 1


def test_use_searches_search_paths_then_the_library(files, tmp_path):
    main = files(main='use "extra"\nuse "lora"', **{"lib/extra": "b -> parallel adapter"})
    spec = check_file(main, search_paths=[tmp_path / "lib"])
    assert [r.tuner.name for r in spec.rules] == ["adapter", "lowrank"]
    assert os.path.basename(spec.rules[1].origin) == "lora.ut"


def test_use_nested_paths_are_relative_to_each_file(files, tmp_path):
    main = files(main='use "sub/a"', **{"sub/a": 'use "b"', "sub/b": "x -> parallel lowrank"})
    (rule,) = check_file(main).rules
    assert rule.origin == str(tmp_path / "sub" / "b.ut")


def test_use_not_found_points_at_the_string(files):
    main = files(main='train head\nuse "nothere"')
    (diagnostic,) = errors(open(main).read(), path=main)
    assert (diagnostic.line, diagnostic.column, diagnostic.span.end_column) == (2, 5, 14)
    assert diagnostic.message == "cannot find the spec 'nothere'"
    assert "searched " in diagnostic.hint and "nothere.ut" in diagnostic.hint and "specs" in diagnostic.hint


@pytest.mark.parametrize("texts, line, column, cycle", [
    ({"main": 'use "main"'}, 1, 5, "main.ut -> main.ut"),
    ({"main": 'train x\nuse "a"', "a": 'use "b.ut"', "b": '\n\nuse "main"'}, 3, 5,
     "main.ut -> a.ut -> b.ut -> main.ut"),
])
def test_use_cycles_are_errors(files, tmp_path, texts, line, column, cycle):
    main = files(**texts)
    (diagnostic,) = errors(open(main).read(), path=main)
    assert (diagnostic.line, diagnostic.column) == (line, column)
    assert diagnostic.message.endswith(f"is used in a cycle: {cycle}")


def test_using_a_file_twice_is_not_a_cycle(files):
    main = files(main='use "a"\nuse "b"', a='use "c"', b='use "c"', c="x -> parallel lowrank")
    assert len(check_file(main).rules) == 2


def test_errors_in_used_files_point_into_them(files, tmp_path):
    main = files(main='use "bad_syntax"\nuse "bad_check"\na -> parallel lowrnk',
                 bad_syntax="train head\nx -> parallel lowrank(r=8",
                 bad_check="\nx -> parallel lowrank(r=0)")
    diagnostics = errors(open(main).read(), path=main)
    where = [(os.path.basename(d.span.source.path), d.line, d.column) for d in diagnostics]
    assert where == [("bad_syntax.ut", 2, 26), ("bad_check.ut", 2, 25), ("main.ut", 3, 15)]
    assert diagnostics[0].message == "unexpected end of input"
    assert str(tmp_path / "bad_check.ut") + ":2:25: error: bad value for 'r'" in diagnostics[1].render()


def test_used_lets_are_defaults_the_user_can_set_first(files):
    texts = dict(lora="let r = 8\nlet alpha = 2 * r\nx -> parallel lowrank(r=r, alpha=alpha)")
    assert check_file(files(main='use "lora"', **texts)).rules[0].args == LowRankArgs(r=8, alpha=16)
    spec = check_file(files(main='let r = 2\nuse "lora"', **texts))
    assert spec.rules[0].args == LowRankArgs(r=2, alpha=4)
    assert spec.bindings == {"r": 2, "alpha": 4}
    # set after the use, it does not reach the used spec
    spec = check_file(files(main='use "lora"\nlet r = 2', **texts))
    assert spec.rules[0].args == LowRankArgs(r=8, alpha=16) and spec.bindings == {"r": 2, "alpha": 16}


def test_used_lets_do_not_leak_back(files):
    main = files(main='use "a"\ny -> parallel adapter(activation=act)', a="let act = gelu")
    (diagnostic,) = errors(open(main).read(), path=main)
    assert diagnostic.message.startswith("bad value for 'activation'") and diagnostic.line == 2


def test_overrides_reach_used_files(files):
    main = files(main='use "a"', a="let r = 8\nx -> parallel lowrank(r=r)")
    assert check_file(main, {"r": "4"}).rules[0].args.r == 4


def test_duplicate_let_is_per_file(files):
    main = files(main='let d = 2\nuse "a"\nuse "a"', a="let d = 8\nx -> parallel adapter(dim=d)")
    assert [r.args.dim for r in check_file(main).rules] == [2, 2]
