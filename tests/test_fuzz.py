"""Fuzzing the front end: any text parses to a Spec or raises a clean UtdslError (never another
exception), through check too; valid specs written with any layout parse to the same AST, and a
parsed spec printed back parses to the same AST again."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utdsl.check import check
from utdsl.errors import Span, UtdslError
from utdsl.parse import parse
from utdsl.syntax import BinOp, Freeze, Header, Let, Literal, Neg, Ref, Rule, Train, Use

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SPECS = settings(FUZZ, max_examples=150)  # valid specs are slower to generate


def parse_and_check(text: str, overrides=None) -> None:
    """Parse and check ``text``: only a Spec or a UtdslError with rendered diagnostics may come."""
    try:
        spec = parse(text)
        check(spec, overrides)
    except UtdslError as err:
        assert err.diagnostics
        for diagnostic in err.diagnostics:
            assert diagnostic.message
            if diagnostic.span is not None:
                assert diagnostic.span.line >= 1 and diagnostic.span.column >= 1
        str(err)


@FUZZ
@given(st.text())
def test_any_text(text):
    parse_and_check(text)


@FUZZ
@given(st.text(alphabet=st.sampled_from("ab01 .*^|()[]{}:,=-+/\"'#\n\t\\->_xqv"), max_size=60))
def test_any_text_of_spec_characters(text):
    parse_and_check(text)


TOKENS = ["spec", "let", "use", "train", "freeze", "true", "false", "of", "->", "parallel",
          "sequential", "lowrank", "adapter", "affine", "r", "alpha", "q", "v", "blocks", "attn",
          "qkv", "0", "2", "3", "1.5", "1e-3", '"s"', '"lora"', '"', "(", ")", "[", "]", "{", "}",
          ".", "*", "**", "^", "|", ",", ":", "=", "+", "-", "/", "#", "\n", "\n\n"]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=30), st.lists(st.sampled_from(["", " ", "\n"])),
       st.dictionaries(st.sampled_from(["r", "alpha", "x"]),
                       st.sampled_from(["1", "-2", "0.5", "true", "s"])))
def test_token_soups(tokens, separators, overrides):
    separators = separators or [" "]
    text = "".join(t + separators[i % len(separators)] for i, t in enumerate(tokens))
    parse_and_check(text, overrides)


# ---- valid specs: layout independence and round trips ---------------------------------------

KEYWORDS = {"spec", "let", "use", "train", "freeze", "true", "false", "of"}
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
free_names = names.filter(lambda n: n not in KEYWORDS)
ints = st.integers(0, 10**6)


def segment():
    index = st.one_of(ints.map(str), st.tuples(st.one_of(st.just(""), ints.map(str)),
                                               st.one_of(st.just(""), ints.map(str))).map(":".join))
    named = st.tuples(names, st.lists(index, max_size=2)).map(
        lambda t: t[0] + (f"[{', '.join(t[1])}]" if t[1] else ""))
    return st.one_of(named, ints.map(str), st.just("*"), st.just("**"))


def path(depth=0):
    segments = segment() if depth > 1 else st.one_of(segment(), group(depth + 1))
    return st.lists(segments, min_size=1, max_size=4).map(".".join)


def group(depth):
    return st.lists(path(depth), min_size=1, max_size=3).map(lambda ps: "(" + " | ".join(ps) + ")")


chunks = st.one_of(
    st.just(""),
    st.lists(st.sampled_from("qkv"), min_size=1, max_size=3).map(lambda ls: "{" + ", ".join(ls) + "}"),
    st.tuples(st.lists(ints.map(str), min_size=1, max_size=3), ints).map(
        lambda t: "{" + ", ".join(t[0]) + f" of {t[1]}" + "}"))
# a selector at the start of a line must not start with a statement keyword
selectors = st.tuples(st.booleans(), st.lists(path(), min_size=1, max_size=3), chunks).map(
    lambda t: ("^" if t[0] else "") + " | ".join(t[1]) + t[2]).filter(
    lambda s: s.split(".")[0].split("[")[0].split(" ")[0] not in KEYWORDS)

strings = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=8)


def quote(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t") + '"'


atoms = st.one_of(ints.map(str), st.floats(0, 1e6).map(repr), strings.map(quote),
                  st.sampled_from(["true", "false"]), free_names)
values = st.recursive(atoms, lambda inner: st.one_of(
    inner.map(lambda v: f"-{v}"), inner.map(lambda v: f"({v})"),
    st.tuples(inner, st.sampled_from("+-*/"), inner).map(lambda t: f"{t[0]} {t[1]} ({t[2]})")), max_leaves=6)
args = st.lists(st.tuples(names, values).map("=".join), max_size=3)
statements = st.one_of(
    st.tuples(selectors, names, names, st.one_of(st.none(), args)).map(
        lambda t: f"{t[0]} -> {t[1]} {t[2]}" + ("" if t[3] is None else f"({', '.join(t[3])})")),
    selectors.map(lambda s: f"train {s}"), selectors.map(lambda s: f"freeze {s}"),
    st.tuples(names, values).map(lambda t: f"let {t[0]} = {t[1]}"),
    strings.map(lambda s: f"use {quote(s)}"),
    st.tuples(names, strings).map(lambda t: f"spec {t[0]} {quote(t[1])}"),
)


def shape(node):
    """A node without its spans, as nested tuples."""
    if dataclasses.is_dataclass(node) and not isinstance(node, (type, Span)):
        return (type(node).__name__, *(shape(getattr(node, f.name)) for f in dataclasses.fields(node)
                                       if "span" not in f.name and f.name not in ("source", "bindings")))
    if isinstance(node, tuple):
        return tuple(shape(n) for n in node)
    return node


def noisy(text: str, draw) -> str:
    """The same statement with extra spaces, and line breaks and comments inside brackets."""
    out, in_string, escaped = [], False, False
    for char in text:
        out.append(char)
        if in_string:
            in_string, escaped = (char != '"' or escaped), (char == "\\" and not escaped)
        elif char == '"':
            in_string = True
        elif char in "([{,":
            out.append(draw(st.sampled_from(["", " ", "\n", "  # note\n   ", "\t"])))
    return " " + "".join(out) + draw(st.sampled_from(["", "  ", "  # trailing comment"]))


@FUZZ_SPECS
@given(st.lists(statements, max_size=6), st.data())
def test_layout_does_not_change_the_ast(lines, data):
    canonical = "\n".join(lines)
    laid_out = "# a spec\n\n" + "\n\n".join(noisy(line, data.draw) for line in lines) + "\n"
    assert shape(parse(laid_out).statements) == shape(parse(canonical).statements)
    parse_and_check(laid_out)


def unparse_value(expr) -> str:
    if isinstance(expr, Literal):
        if isinstance(expr.value, bool):
            return "true" if expr.value else "false"
        return quote(expr.value) if isinstance(expr.value, str) else repr(expr.value)
    if isinstance(expr, Ref):
        return expr.name
    if isinstance(expr, Neg):
        return f"-({unparse_value(expr.operand)})"
    assert isinstance(expr, BinOp)
    return f"({unparse_value(expr.left)}) {expr.op} ({unparse_value(expr.right)})"


def unparse(statement) -> str:
    if isinstance(statement, Header):
        return f"spec {statement.name} {quote(statement.description)}"
    if isinstance(statement, Let):
        return f"let {statement.name} = {unparse_value(statement.value)}"
    if isinstance(statement, Use):
        return f"use {quote(statement.path)}"
    if isinstance(statement, (Train, Freeze)):
        return f"{type(statement).__name__.lower()} {statement.selector}"
    assert isinstance(statement, Rule)
    call = statement.tuner
    arguments = ", ".join(f"{a.name}={unparse_value(a.value)}" for a in call.args)
    return f"{statement.selector} -> {statement.placement} {call.name}({arguments})"


@FUZZ_SPECS
@given(st.lists(statements, max_size=6))
def test_printed_specs_parse_back_to_the_same_ast(lines):
    spec = parse("\n".join(lines))
    printed = "\n".join(unparse(s) for s in spec.statements)
    assert shape(parse(printed).statements) == shape(spec.statements)
