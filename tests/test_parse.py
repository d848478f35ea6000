"""parse: text -> AST. Tables of inputs and the exact nodes (spans left out) or spans they give."""

from __future__ import annotations

import dataclasses
import time

import pytest

from utdsl.errors import Span
from utdsl.parse import parse, parser
from utdsl.syntax import Freeze, Header, Let, Rule, Train, Use


def shape(node):
    """A node as nested tuples without spans and sources: (ClassName, field, ...)."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        if isinstance(node, Span):
            return "span"
        return (type(node).__name__, *(shape(getattr(node, f.name)) for f in dataclasses.fields(node)
                                       if "span" not in f.name and f.name not in ("source", "bindings")))
    if isinstance(node, tuple):
        return tuple(shape(n) for n in node)
    return node


def n(text, *indices):
    return ("Name", text, tuple(indices))


def r(start, stop):
    return ("IndexRange", start, stop, False)


def one(i):
    return ("IndexRange", i, None, True)


def path(*segments, rooted=False, role=None, chunks=None):
    return ("Path", tuple(segments), rooted, role, chunks)


def group(*paths):
    return ("Group", tuple(paths))


def sel(*paths, chunks=None):
    """A selector; ``chunks`` belong to its last path."""
    if chunks is not None:
        paths = (*paths[:-1], (*paths[-1][:-1], chunks))
    return ("Selector", tuple(paths))


STAR, GLOB = ("Star",), ("GlobStar",)


# ---- selectors -------------------------------------------------------------------------------

SELECTORS = [
    ("attn", sel(path(n("attn")))),
    ("attn.qkv", sel(path(n("attn"), n("qkv")))),
    ("blocks.0.attn", sel(path(n("blocks"), n("0"), n("attn")))),
    ("blocks.*.mlp", sel(path(n("blocks"), STAR, n("mlp")))),
    ("**.bias", sel(path(GLOB, n("bias")))),
    ("^norm", sel(path(n("norm"), rooted=True))),
    ("@classifier", sel(path(rooted=True, role="classifier"))),
    ("@classifier.bias | head", sel(path(n("bias"), rooted=True, role="classifier"), path(n("head")))),
    ("^blocks.**", sel(path(n("blocks"), GLOB, rooted=True))),
    ("blocks[0:6].attn", sel(path(n("blocks", r(0, 6)), n("attn")))),
    ("blocks[3]", sel(path(n("blocks", one(3))))),
    ("blocks[0:2, 5]", sel(path(n("blocks", r(0, 2), one(5))))),
    ("blocks[:2, 10:]", sel(path(n("blocks", r(None, 2), r(10, None))))),
    ("blocks[:]", sel(path(n("blocks", r(None, None))))),
    ("a | b.c", sel(path(n("a")), path(n("b"), n("c")))),
    ("blocks[0:6].attn | blocks.*.mlp.fc1",
     sel(path(n("blocks", r(0, 6)), n("attn")), path(n("blocks"), STAR, n("mlp"), n("fc1")))),
    ("layers.*.blocks.*.(attn | mlp)",
     sel(path(n("layers"), STAR, n("blocks"), STAR,
              group(path(n("attn")), path(n("mlp")))))),
    ("x.(a.b | (c | d)).y",
     sel(path(n("x"), group(path(n("a"), n("b")), path(group(path(n("c")), path(n("d"))))), n("y")))),
    ("attn.qkv{q, v}", sel(path(n("attn"), n("qkv")), chunks=("Chunks", ("q", "v"), (0, 2), 3))),
    ("attn.qkv{k}", sel(path(n("attn"), n("qkv")), chunks=("Chunks", ("k",), (1,), 3))),
    ("mlp.fc1{0, 2 of 4}", sel(path(n("mlp"), n("fc1")), chunks=("Chunks", ("0", "2"), (0, 2), 4))),
    ("attn.qkv{q, v of 3}", sel(path(n("attn"), n("qkv")), chunks=("Chunks", ("q", "v"), (0, 2), 3))),
    ("a | b{v}", sel(path(n("a")), path(n("b")), chunks=("Chunks", ("v",), (2,), 3))),
    ("a{q, v} | b | c{0 of 2}", sel(path(n("a"), chunks=("Chunks", ("q", "v"), (0, 2), 3)), path(n("b")),
                                    path(n("c"), chunks=("Chunks", ("0",), (0,), 2)))),
    # keywords are names inside a selector
    ("blocks.train.use", sel(path(n("blocks"), n("train"), n("use")))),
    ("true.false.of", sel(path(n("true"), n("false"), n("of")))),
    ("^spec", sel(path(n("spec"), rooted=True))),
]


@pytest.mark.parametrize("text, expected", SELECTORS)
def test_selectors(text, expected):
    spec = parse(f"train {text}")
    (statement,) = spec.statements
    assert isinstance(statement, Train)
    assert shape(statement.selector) == expected


@pytest.mark.parametrize("text", [text for text, _ in SELECTORS])
def test_selector_str_round_trips(text):
    selector = parse(f"train {text}").statements[0].selector
    assert shape(parse(f"train {selector}").statements[0].selector) == shape(selector)


# ---- values ----------------------------------------------------------------------------------

def lit(value):
    return ("Literal", value)


VALUES = [
    ("8", lit(8)),
    ("0", lit(0)),
    ("1.5", lit(1.5)),
    ("1e-3", lit(1e-3)),
    ("2.", lit(2.0)),
    (".5", lit(0.5)),
    ("3E+2", lit(300.0)),
    ('"learned"', lit("learned")),
    ('""', lit("")),
    (r'"a \"b\" \\ c\n\q"', lit('a "b" \\ c\n\\q')),
    ('"# not a comment"', lit("# not a comment")),
    ("true", lit(True)),
    ("false", lit(False)),
    ("gelu", ("Ref", "gelu")),
    ("-1", ("Neg", lit(1))),
    ("--1", ("Neg", ("Neg", lit(1)))),
    ("2 * r", ("BinOp", "*", lit(2), ("Ref", "r"))),
    ("1 + 2 * 3", ("BinOp", "+", lit(1), ("BinOp", "*", lit(2), lit(3)))),
    ("(1 + 2) * 3", ("BinOp", "*", ("BinOp", "+", lit(1), lit(2)), lit(3))),
    ("8 - 2 - 1", ("BinOp", "-", ("BinOp", "-", lit(8), lit(2)), lit(1))),
    ("8 / 2 / 2", ("BinOp", "/", ("BinOp", "/", lit(8), lit(2)), lit(2))),
    ("-r * 2", ("BinOp", "*", ("Neg", ("Ref", "r")), lit(2))),
    ("1-2", ("BinOp", "-", lit(1), lit(2))),
]


@pytest.mark.parametrize("text, expected", VALUES)
def test_values(text, expected):
    (let,) = parse(f"let x = {text}").statements
    assert shape(let) == ("Let", "x", expected)
    (rule,) = parse(f"a -> parallel t(x={text})").statements
    assert shape(rule.tuner.args) == (("Arg", "x", expected),)


# ---- statements ------------------------------------------------------------------------------

STATEMENTS = [
    ('spec lora "LoRA (Hu et al., 2021) on q and v, r=8"',
     ("Header", "lora", "LoRA (Hu et al., 2021) on q and v, r=8")),
    ("spec lora", ("Header", "lora", "")),
    ('use "adapter.ut"', ("Use", "adapter.ut")),
    ("train head", ("Train", sel(path(n("head"))))),
    ("freeze blocks[0:2].**", ("Freeze", sel(path(n("blocks", r(0, 2)), GLOB)))),
    ("a -> parallel adapter",
     ("Rule", sel(path(n("a"))), "parallel", ("TunerCall", "adapter", ()), None, None, None)),
    ("a -> parallel adapter()",
     ("Rule", sel(path(n("a"))), "parallel", ("TunerCall", "adapter", ()), None, None, None)),
    ("a -> sequential adapter(dim=8, activation=gelu, scale=\"learned\",)",
     ("Rule", sel(path(n("a"))), "sequential",
      ("TunerCall", "adapter", (("Arg", "dim", lit(8)), ("Arg", "activation", ("Ref", "gelu")),
                                ("Arg", "scale", lit("learned")))), None, None, None)),
    # placement and tuner are plain names here; check validates them
    ("a -> let use(train=1)",
     ("Rule", sel(path(n("a"))), "let", ("TunerCall", "use", (("Arg", "train", lit(1)),)), None, None, None)),
]


@pytest.mark.parametrize("text, expected", STATEMENTS)
def test_statements(text, expected):
    (statement,) = parse(text).statements
    assert shape(statement) == expected


def test_full_spec_in_order_with_header():
    text = '''# LoRA, as in the paper
spec lora "LoRA on q and v"   # header

let r = 8
let alpha = 2 * r
use "adapter.ut"
attn.qkv{q, v} -> parallel lowrank(r=r, alpha=alpha)
train head
freeze blocks[0:2].**
'''
    spec = parse(text, "specs/lora.ut")
    assert [type(s) for s in spec.statements] == [Header, Let, Let, Use, Rule, Train, Freeze]
    assert (spec.name, spec.description) == ("lora", "LoRA on q and v")
    assert spec.source.text == text and spec.source.path == "specs/lora.ut"
    assert all(s.span.source is spec.source for s in spec.statements)
    assert spec.rules[0].args is None


@pytest.mark.parametrize("text", ["", "\n", "# only a comment", "# a\n\n   # b\n", "  \n\t\n"])
def test_empty_specs(text):
    spec = parse(text)
    assert spec.statements == () and spec.name is None


LAYOUT = [
    # newlines inside (), [] and {} are ignored
    "a -> parallel lowrank(r=8,\n                     alpha=16)",
    "a -> parallel lowrank(\n  r=8,  # the rank\n  alpha=16,\n)",
    "a -> parallel lowrank(r=8, alpha=16)",
    "a->parallel lowrank(r=8,alpha=16)",
    "  a  ->  parallel  lowrank ( r = 8 , alpha = 16 )  # trailing comment",
    "\n\n# lead\n\na -> parallel lowrank(r=8, alpha=16)\n\n\n",
    "a -> parallel lowrank(r=8, alpha=16)\r\n",
    "a -> parallel lowrank(r=(8\n), alpha=(\n16))",
]


@pytest.mark.parametrize("text", LAYOUT)
def test_layout_does_not_change_the_ast(text):
    expected = ("Rule", sel(path(n("a"))), "parallel",
                ("TunerCall", "lowrank", (("Arg", "r", lit(8)), ("Arg", "alpha", lit(16)))), None, None, None)
    assert shape(parse(text).statements) == (expected,)


def test_newlines_inside_selector_brackets():
    spec = parse("blocks[0:2,\n 5].(attn |\n mlp){q,\n v} -> parallel lowrank\ntrain head")
    assert [type(s) for s in spec.statements] == [Rule, Train]
    assert str(spec.statements[0].selector) == "blocks[0:2, 5].(attn | mlp){q, v}"


# ---- spans -----------------------------------------------------------------------------------

def at(span):
    return span.line, span.column, span.end_line, span.end_column


def test_rule_spans_are_exact():
    text = "let r = 8\nattn.qkv{q, v} -> parallel lowrank(r=r,\n    alpha=2 * r)"
    let, rule = parse(text).statements
    assert at(let.span) == (1, 1, 1, 10)
    assert at(let.value.span) == (1, 9, 1, 10)
    assert at(rule.span) == (2, 1, 3, 17)
    assert at(rule.selector.span) == (2, 1, 2, 15)
    assert at(rule.selector.paths[0].span) == (2, 1, 2, 9)
    assert at(rule.selector.paths[0].segments[1].span) == (2, 6, 2, 9)
    assert at(rule.selector.paths[0].chunks.span) == (2, 9, 2, 15)
    assert at(rule.placement_span) == (2, 19, 2, 27)
    assert at(rule.tuner.span) == (2, 28, 3, 17)
    assert at(rule.tuner.name_span) == (2, 28, 2, 35)
    r_arg, alpha = rule.tuner.args
    assert at(r_arg.span) == (2, 36, 2, 39)
    assert at(alpha.span) == (3, 5, 3, 16)
    assert at(alpha.value.span) == (3, 11, 3, 16)
    assert at(alpha.value.right.span) == (3, 15, 3, 16)


def test_selector_and_use_spans():
    use, train = parse('use "lora"\ntrain ^blocks[0:2, 5].**').statements
    assert at(use.span) == (1, 1, 1, 11) and at(use.path_span) == (1, 5, 1, 11)
    assert at(train.selector.paths[0].span) == (2, 7, 2, 25)
    blocks, glob = train.selector.paths[0].segments
    assert at(blocks.span) == (2, 8, 2, 22)
    assert [at(i.span) for i in blocks.indices] == [(2, 15, 2, 18), (2, 20, 2, 21)]
    assert at(glob.span) == (2, 23, 2, 25)


def test_numeric_chunks_without_count_parse_with_count_zero():
    (train,) = parse("train x{0, 2}").statements
    assert train.selector.paths[0].chunks.count == 0  # check reports it


def test_parse_is_fast_once_the_parser_is_built():
    parser()
    text = "\n".join([
        'spec s "twenty lines"', "let r = 8", "let alpha = 2 * r", "let d = 64",
        *[f"blocks[{i}:{i + 2}].attn.qkv{{q, v}} -> parallel lowrank(r=r, alpha=alpha)" for i in range(8)],
        *[f"blocks.*.(attn | mlp).fc{i} -> sequential adapter(dim=d, scale=\"learned\")" for i in range(6)],
        "train head", "freeze blocks[0:2].**",
    ])
    assert len(text.splitlines()) == 20
    parse(text)
    start = time.perf_counter()
    for _ in range(20):
        parse(text)
    assert (time.perf_counter() - start) / 20 < 0.010


def test_nodes_behave_as_frozen_dataclasses():
    """AST nodes are slotted with a generated ``__init__`` and ``__replace__``
    (:func:`utdsl.syntax._node`): they construct, compare, hash, copy, pickle and replace as
    frozen dataclasses do."""
    import copy
    import pickle

    (rule,) = parse("blocks[0:2].attn{q, v} -> parallel lowrank(r=-(2), alpha=r * 2)").statements
    for node in (rule, rule.selector.paths[0], rule.tuner.args[1].value):
        fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
        assert type(node)(**fields) == node and hash(type(node)(**fields)) == hash(node)
        assert pickle.loads(pickle.dumps(node)) == node and copy.deepcopy(node) == node
        with pytest.raises(dataclasses.FrozenInstanceError):
            node.span = None
    assert not hasattr(rule, "__dict__")
    assert Rule(rule.selector, "p", rule.tuner, rule.span, rule.placement_span).args is None  # defaults
    changed = rule.__replace__(placement="sequential", origin="x.ut")
    assert changed == dataclasses.replace(rule, placement="sequential", origin="x.ut") != rule
    with pytest.raises(TypeError):
        rule.__replace__(nonsense=1)


def test_parsed_nodes_go_to_the_collector_s_oldest_generation():
    """The nodes of a parse are handed to the oldest generation at once (``keep_as_old``): the
    next young collection does not walk them; objects the program froze stay frozen."""
    import gc

    text = "\n".join(f"blocks.{i}.attn.qkv{{q, v}} -> parallel lowrank(r={i}, alpha=2)" for i in range(2000))
    parse(text)
    assert gc.get_count()[0] < 100
    sentinel = [object()]             # a container the collector tracks
    gc.freeze()
    try:
        parse(text)
        # still in the permanent generation, which ``gc.get_objects`` does not list (other frozen
        # objects may die meanwhile, so the freeze count itself can drop)
        assert gc.get_freeze_count() > 0
        assert not any(o is sentinel for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is sentinel for o in gc.get_objects())
