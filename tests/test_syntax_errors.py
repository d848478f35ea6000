"""Syntax errors: every catalog example, first and later statement, gives its own hint at the
exact line and column; bracket, character and end-of-input errors; the rendering with a caret."""

from __future__ import annotations

import pytest

from utdsl import syntax_errors
from utdsl.errors import SpecError
from utdsl.parse import parse
from utdsl.syntax_errors import CATALOG, LATER

HINT_OF = {example: hint for hint, examples in CATALOG for example in examples}

# (example, line, column, message) of the first-statement variant; the later-statement variant is
# one line down, same column. Every catalog example is here (test_table_covers_the_catalog).
CATALOG_CASES = [
    # missing '->' between selector and placement
    ('attn.qkv parallel lowrank(r=8)', 1, 10, "unexpected 'parallel'"),
    ('attn parallel lowrank', 1, 6, "unexpected 'parallel'"),
    ('blocks[0:2] parallel lowrank', 1, 13, "unexpected 'parallel'"),
    ('attn.qkv{q, v} parallel lowrank', 1, 16, "unexpected 'parallel'"),
    ('blocks.* parallel lowrank', 1, 10, "unexpected 'parallel'"),
    ('blocks.** parallel lowrank', 1, 11, "unexpected 'parallel'"),
    ('blocks.(a | b) parallel lowrank', 1, 16, "unexpected 'parallel'"),
    ('blocks.0 parallel lowrank', 1, 10, "unexpected 'parallel'"),
    ('a | b parallel lowrank', 1, 7, "unexpected 'parallel'"),
    ('attn.qkv = parallel lowrank', 1, 10, "unexpected '='"),
    ('attn.qkv - parallel lowrank', 1, 10, "unexpected '-'"),
    # a rule is SELECTOR -> PLACEMENT TUNER(ARGS); to train parameters write 'train SELECTOR'
    ('attn.qkv\n', 1, 9, 'unexpected end of line'),
    ('attn.qkv{q}\n', 1, 12, 'unexpected end of line'),
    ('blocks[0:2]\n', 1, 12, 'unexpected end of line'),
    ('blocks.*\n', 1, 9, 'unexpected end of line'),
    ('blocks.**\n', 1, 10, 'unexpected end of line'),
    ('blocks.0\n', 1, 9, 'unexpected end of line'),
    # a rule starts with a selector, e.g. 'blocks.*.attn -> parallel lowrank(r=8)'
    ('-> parallel lowrank', 1, 1, "unexpected '->'"),
    # expected a placement after '->': one of parallel, sequential, prompt, prefix, weight, side
    ('attn ->\n', 1, 8, 'unexpected end of line'),
    ('attn -> (r=8)', 1, 9, "unexpected '('"),
    ('attn -> "parallel" lowrank', 1, 9, 'unexpected string "parallel"'),
    # expected a tuner name after the placement: '-> PLACEMENT TUNER(ARGS)', e.g. '-> parallel lowrank(r=8)'
    ('attn -> parallel\n', 1, 17, 'unexpected end of line'),
    ('attn -> parallel(r=8)', 1, 17, "unexpected '('"),
    ('attn -> lowrank(r=8)', 1, 16, "unexpected '('"),
    # tuner arguments must be name=value
    ('attn -> parallel lowrank(8)', 1, 26, "unexpected '8'"),
    ('attn -> parallel lowrank(r=8, 16)', 1, 31, "unexpected '16'"),
    ('attn -> parallel lowrank("r"=8)', 1, 26, 'unexpected string "r"'),
    ('attn -> parallel lowrank(r)', 1, 27, "unexpected ')'"),
    ('attn -> parallel lowrank(r=8, alpha)', 1, 36, "unexpected ')'"),
    ('attn -> parallel lowrank(r 8)', 1, 28, "unexpected '8'"),
    ('attn -> parallel lowrank(r=8, alpha 16)', 1, 37, "unexpected '16'"),
    ('attn -> parallel lowrank(r: 8)', 1, 27, "unexpected ':'"),
    ('attn -> parallel lowrank(r=8, alpha: 16)', 1, 36, "unexpected ':'"),
    ('attn -> parallel lowrank(r=8, alpha=1, 16)', 1, 40, "unexpected '16'"),
    ('attn -> parallel lowrank(r=8, alpha=1, dropout)', 1, 47, "unexpected ')'"),
    ('attn -> parallel lowrank(r=8, alpha=1, dropout 0)', 1, 48, "unexpected '0'"),
    # missing ',' between arguments
    ('attn -> parallel lowrank(r=8 alpha=16)', 1, 30, "unexpected 'alpha'"),
    ('attn -> parallel lowrank(r=8, alpha=16 dropout=0.1)', 1, 40, "unexpected 'dropout'"),
    ('attn -> parallel lowrank(r="a" alpha=16)', 1, 32, "unexpected 'alpha'"),
    ('attn -> parallel lowrank(r=true alpha=16)', 1, 33, "unexpected 'alpha'"),
    ('attn -> parallel lowrank(r=x alpha=16)', 1, 30, "unexpected 'alpha'"),
    ('attn -> parallel lowrank(r=1.5 alpha=16)', 1, 32, "unexpected 'alpha'"),
    # missing value after '='
    ('attn -> parallel lowrank(r=)', 1, 28, "unexpected ')'"),
    ('attn -> parallel lowrank(r=, alpha=1)', 1, 28, "unexpected ','"),
    ('attn -> parallel lowrank(r=8, alpha=)', 1, 37, "unexpected ')'"),
    ('let r =\n', 1, 8, 'unexpected end of line'),
    # one statement per line
    ('attn -> parallel lowrank(r=8) train head', 1, 31, "unexpected 'train'"),
    ('attn -> parallel lowrank train head', 1, 26, "unexpected 'train'"),
    ('train head freeze x', 1, 12, "unexpected 'freeze'"),
    ('let r = 8 let a = 1', 1, 11, "unexpected 'let'"),
    ('let r = x y', 1, 11, "unexpected 'y'"),
    ('use "a.ut" use "b.ut"', 1, 12, "unexpected 'use'"),
    ('spec a "b" let r = 1', 1, 12, "unexpected 'let'"),
    # expected a value: a number, "string", true/false, a name, or arithmetic on them
    ('let r = * 2', 1, 9, "unexpected '*'"),
    ('let r = 2 * *', 1, 13, "unexpected '*'"),
    ('let r = 2 +\n', 1, 12, 'unexpected end of line'),
    ('let r = ,', 1, 9, "unexpected ','"),
    ('attn -> parallel lowrank(r=*2)', 1, 28, "unexpected '*'"),
    ('attn -> parallel lowrank(r=2 * )', 1, 32, "unexpected ')'"),
    ('attn -> parallel lowrank(r=2 + )', 1, 32, "unexpected ')'"),
    ('let r = (2 + )', 1, 14, "unexpected ')'"),
    ('let r = ()', 1, 10, "unexpected ')'"),
    # expected an operator (+ - * /) or the end of the statement
    ('let r = 8 9', 1, 11, "unexpected '9'"),
    ('let r = 8 "a"', 1, 11, 'unexpected string "a"'),
    ('let r = (8 9)', 1, 12, "unexpected '9'"),
    ('attn -> parallel lowrank(r=(8 9))', 1, 31, "unexpected '9'"),
    # a value in parentheses needs its ')'
    ('let r = (1, 2)', 1, 11, "unexpected ','"),
    ('attn -> parallel lowrank(r=(1, alpha=2)', 1, 30, "unexpected ','"),
    # 'let' needs a name and '= value', e.g. 'let r = 8'
    ('let = 3', 1, 5, "unexpected '='"),
    ('let r 3', 1, 7, "unexpected '3'"),
    ('let r\n', 1, 6, 'unexpected end of line'),
    ('let 3 = r', 1, 5, "unexpected '3'"),
    ('let\n', 1, 4, 'unexpected end of line'),
    ('let r == 3', 1, 8, "unexpected '='"),
    ('let "r" = 3', 1, 5, 'unexpected string "r"'),
    # expected a selector segment after '.'
    ('blocks. -> parallel lowrank', 1, 9, "unexpected '->'"),
    ('train blocks.\n', 1, 14, 'unexpected end of line'),
    ('blocks.(a.) -> parallel lowrank', 1, 11, "unexpected ')'"),
    ('blocks.(a. | b) -> parallel lowrank', 1, 12, "unexpected '|'"),
    # empty selector segment (two dots)
    ('blocks..attn -> parallel lowrank', 1, 8, "unexpected '.'"),
    ('train blocks..attn', 1, 14, "unexpected '.'"),
    ('blocks.(a..b) -> parallel lowrank', 1, 11, "unexpected '.'"),
    # selector segments are names, numbers, '*', '**' or '(a | b)'
    ('blocks."attn" -> parallel lowrank', 1, 8, 'unexpected string "attn"'),
    ('blocks.-1 -> parallel lowrank', 1, 8, "unexpected '-'"),
    ('train blocks.^attn', 1, 14, "unexpected '^'"),
    ('^.attn -> parallel lowrank', 1, 2, "unexpected '.'"),
    ('^^attn -> parallel lowrank', 1, 2, "unexpected '^'"),
    # '|' needs a path on both sides
    ('attn | -> parallel lowrank', 1, 8, "unexpected '->'"),
    ('| attn -> parallel lowrank', 1, 1, "unexpected '|'"),
    ('blocks.(attn |) -> parallel lowrank', 1, 15, "unexpected ')'"),
    ('blocks.(| attn) -> parallel lowrank', 1, 9, "unexpected '|'"),
    ('train attn |\n', 1, 13, 'unexpected end of line'),
    ('attn || mlp -> parallel lowrank', 1, 7, "unexpected '|'"),
    # a group is '(a | b.c)', e.g. 'blocks.*.(attn | mlp)'
    ('blocks.() -> parallel lowrank', 1, 9, "unexpected ')'"),
    ('blocks.(attn mlp) -> parallel lowrank', 1, 14, "unexpected 'mlp'"),
    ('blocks.(attn, mlp) -> parallel lowrank', 1, 13, "unexpected ','"),
    ('blocks.(attn | mlp -> parallel lowrank', 1, 20, "unexpected '->'"),
    ('blocks.(attn | mlp{q}) -> parallel lowrank', 1, 19, "unexpected '{'"),
    # indices look like [3], [0:6], [:2] or [0:2, 5] (non-negative integers)
    ('blocks[] -> parallel lowrank', 1, 8, "unexpected ']'"),
    ('blocks[a] -> parallel lowrank', 1, 8, "unexpected 'a'"),
    ('blocks[-1] -> parallel lowrank', 1, 8, "unexpected '-'"),
    ('blocks[0:-1] -> parallel lowrank', 1, 10, "unexpected '-'"),
    ('blocks[0:2:1] -> parallel lowrank', 1, 11, "unexpected ':'"),
    ('blocks[0 2] -> parallel lowrank', 1, 10, "unexpected '2'"),
    ('blocks[0:2 5] -> parallel lowrank', 1, 12, "unexpected '5'"),
    ('blocks[0,] -> parallel lowrank', 1, 10, "unexpected ']'"),
    ('blocks[1.5] -> parallel lowrank', 1, 9, "unexpected '.5'"),
    # only names take indices, e.g. 'blocks[0:6]'
    ('*[0] -> parallel lowrank', 1, 2, "unexpected '['"),
    ('**[0] -> parallel lowrank', 1, 3, "unexpected '['"),
    ('blocks.0[1] -> parallel lowrank', 1, 9, "unexpected '['"),
    ('(a | b)[0] -> parallel lowrank', 1, 8, "unexpected '['"),
    # chunks look like {q, v} or {0, 2 of 4}
    ('attn.qkv{} -> parallel lowrank', 1, 10, "unexpected '}'"),
    ('attn.qkv{q v} -> parallel lowrank', 1, 12, "unexpected 'v'"),
    ('attn.qkv{0, 2 of} -> parallel lowrank', 1, 17, "unexpected '}'"),
    ('attn.qkv{0 of 4, 2} -> parallel lowrank', 1, 16, "unexpected ','"),
    ('attn.qkv{q,} -> parallel lowrank', 1, 12, "unexpected '}'"),
    ('attn.qkv{of 3} -> parallel lowrank', 1, 13, "unexpected '3'"),
    ('attn.qkv{"q"} -> parallel lowrank', 1, 10, 'unexpected string "q"'),
    ('attn.qkv{0, 2 of x} -> parallel lowrank', 1, 18, "unexpected 'x'"),
    # chunks end a path: 'a.qkv{q, v} | b'
    ('attn.qkv{q}.x -> parallel lowrank', 1, 12, "unexpected '.'"),
    ('attn.qkv{q}{v} -> parallel lowrank', 1, 12, "unexpected '{'"),
    # 'spec' takes a name and a quoted description, e.g. spec lora "LoRA on q and v"
    ('spec "lora"', 1, 6, 'unexpected string "lora"'),
    ('spec lora description', 1, 11, "unexpected 'description'"),
    ('spec\n', 1, 5, 'unexpected end of line'),
    ('spec lora "a" "b"', 1, 15, 'unexpected string "b"'),
    ('spec 3', 1, 6, "unexpected '3'"),
    # 'use' takes a quoted file or library name, e.g. use "lora.ut"
    ('use lora', 1, 5, "unexpected 'lora'"),
    ('use\n', 1, 4, 'unexpected end of line'),
    ('use 3', 1, 5, "unexpected '3'"),
    # 'train' and 'freeze' take a selector, e.g. 'train **.bias'
    ('train\n', 1, 6, 'unexpected end of line'),
    ('freeze\n', 1, 7, 'unexpected end of line'),
    ('train -> parallel lowrank', 1, 7, "unexpected '->'"),
    ('train "head"', 1, 7, 'unexpected string "head"'),
    ('freeze = 1', 1, 8, "unexpected '='"),
    # after the selector of 'train'/'freeze' the line ends (missing '.' between segments?)
    ('train head x', 1, 12, "unexpected 'x'"),
    ('train ** bias', 1, 10, "unexpected 'bias'"),
    ('train blocks[0:2] **', 1, 19, "unexpected '**'"),
    ('train blocks.* x', 1, 16, "unexpected 'x'"),
    ('train blocks.0 x', 1, 16, "unexpected 'x'"),
    ('train (a | b) x', 1, 15, "unexpected 'x'"),
    ('freeze head x', 1, 13, "unexpected 'x'"),
    ('train head "x"', 1, 12, 'unexpected string "x"'),
    # 'train' and 'freeze' take no placement or tuner: 'train SELECTOR'
    ('train head -> parallel lowrank', 1, 12, "unexpected '->'"),
    ('freeze head -> parallel lowrank', 1, 13, "unexpected '->'"),
    ('train blocks.*.attn -> parallel lowrank', 1, 21, "unexpected '->'"),
    # tuner arguments go in parentheses after the tuner name: 'lowrank(r=8)'
    ('attn -> parallel lowrank r=8', 1, 26, "unexpected 'r'"),
    ('attn -> parallel lowrank[r=8]', 1, 25, "unexpected '['"),
    ('attn -> parallel lowrank{r=8}', 1, 25, "unexpected '{'"),
    ('attn -> parallel lowrank 8', 1, 26, "unexpected '8'"),
]


def error_of(text: str, path: str = "<string>"):
    with pytest.raises(SpecError) as info:
        parse(text, path)
    (diagnostic,) = info.value.diagnostics
    return info.value, diagnostic


def test_table_covers_the_catalog():
    assert sorted(example for example, *_ in CATALOG_CASES) == sorted(HINT_OF)
    assert len(HINT_OF) == sum(len(examples) for _, examples in CATALOG)  # no example twice


@pytest.mark.parametrize("later", [False, True], ids=["first", "later"])
@pytest.mark.parametrize("example, line, column, message", CATALOG_CASES)
def test_catalog_example(example, line, column, message, later):
    text = LATER + example if later else example
    _, diagnostic = error_of(text)
    assert (diagnostic.line, diagnostic.column, diagnostic.message) == (line + later, column, message)
    assert diagnostic.hint == HINT_OF[example]


# mistakes nested deeper than the catalog's examples get the same hints (the LALR stack depth
# is ignored when matching)
DEEPER = [
    ("let r = 1\nlet a = (r + (2 * (3 +)))", 2, 23, "unexpected ')'",
     "expected a value: a number"),
    ("a -> parallel t(a=1, b=2, c=3, 4)", 1, 32, "unexpected '4'", "tuner arguments must be name=value"),
    ("a -> parallel t(a=1, b=2, c=3 d=4)", 1, 31, "unexpected 'd'", "missing ',' between arguments"),
    ("a.b.c.d..e -> parallel t", 1, 9, "unexpected '.'", "empty selector segment (two dots)"),
    ("x.(a | (b | c.)) -> parallel t", 1, 15, "unexpected ')'", "expected a selector segment after '.'"),
    ("let r = 8 y", 1, 11, "unexpected 'y'", "one statement per line"),
    # ... and so do mistakes in states no example reaches, by the tokens the state accepts
    ("let a = -2 * (r 1.5)", 1, 17, "unexpected '1.5'", "expected an operator"),
    ("freeze blocks[0:2] x.y", 1, 20, "unexpected 'x'", "after the selector of 'train'/'freeze'"),
    ("a.b. -> parallel t", 1, 6, "unexpected '->'", "expected a selector segment after '.'"),
    ("x{0, 2 2 of 4} -> parallel t", 1, 8, "unexpected '2'", "chunks look like"),
]

OTHER_ERRORS = [
    # brackets: unclosed (error on a later line or at the end), unmatched, mismatched
    ("a -> parallel lowrank(r=8", 1, 26, "unexpected end of input",
     "unclosed '(' (opened at line 1, column 22)"),
    ("a -> parallel lowrank(r=8,\n", 1, 27, "unexpected end of input",
     "unclosed '(' (opened at line 1, column 22)"),
    ("a -> parallel lowrank(r=8\nb -> parallel x", 2, 1, "unexpected 'b'",
     "unclosed '(' (opened at line 1, column 22)"),
    ("train blocks[0:2\ntrain head", 2, 1, "unexpected 'train'",
     "unclosed '[' (opened at line 1, column 13)"),
    ("train x{q, v\n# c\n", 1, 13, "unexpected end of input", "unclosed '{' (opened at line 1, column 8)"),
    ("let r = (1 + 2", 1, 15, "unexpected end of input", "unclosed '(' (opened at line 1, column 9)"),
    ("a -> parallel lowrank(r=8\n  alpha=3)", 2, 3, "unexpected 'alpha'", "missing ',' between arguments"),
    ("a -> parallel lowrank(r=8))", 1, 27, "unexpected ')'", "unmatched ')'"),
    ("train head)", 1, 11, "unexpected ')'", "unmatched ')'"),
    ("train a{q}}", 1, 11, "unexpected '}'", "unmatched '}'"),
    ("blocks[0:2) -> parallel x", 1, 11, "unexpected ')'", "')' does not close '['"),
    # characters no token starts with
    ('let s = "abc', 1, 9, "unexpected character '\"'", "unterminated string"),
    ('let r = 1\nuse "lora.ut\ntrain head', 2, 5, "unexpected character '\"'", "unterminated string"),
    ("let s = 'abc'", 1, 9, "unexpected character \"'\"", "double quotes"),
    ("let s = 3 $ 4", 1, 11, "unexpected character '$'", "expected one of '*', '+', '-', '/', end of line"),
    ("$", 1, 1, "unexpected character '$'",
     "expected one of 'freeze', 'let', 'spec', 'train', 'tuner', 'use', a name, a role (@classifier), an integer, '(', '*', '**', '^'"),
    ("train a.b\t@", 1, 11, "unexpected character '@'", "expected one of '(', '.', '[', '{', '|', end of line"),
    # the end of a line is reported just after its last character, not at a comment after it
    ("a -> parallel   # comment\n", 1, 14, "unexpected end of line", "expected a tuner name"),
    ("train head\n\n  let r =   # c\n", 3, 10, "unexpected end of line", "missing value after '='"),
    ("a -> parallel", 1, 14, "unexpected end of input", "expected a tuner name"),
    # a keyword where a selector starts is a keyword
    ("train.x -> parallel t", 1, 6, "unexpected '.'", "'train' and 'freeze' take a selector"),
    # the fallback: what would have been accepted, in words
    ("a -> parallel t(x=1) extra", 1, 22, "unexpected 'extra'", "one statement per line"),
    ("blocks[0 : 2 : 3] -> parallel t", 1, 14, "unexpected ':'", "indices look like"),
    ("let x = 123456789" + "0" * 5000, 1, 9, "integer literal is too long", None),
]


@pytest.mark.parametrize("text, line, column, message, hint", DEEPER + OTHER_ERRORS)
def test_other_errors(text, line, column, message, hint):
    _, diagnostic = error_of(text)
    assert (diagnostic.line, diagnostic.column, diagnostic.message) == (line, column, message)
    if hint is None:
        assert diagnostic.hint is None
    else:
        assert hint in diagnostic.hint


@pytest.mark.parametrize("text, hint", [
    ("a -> parallel t(x=1 =", "expected one of ')', '*', '+', ',', '-', '/'"),
    ("let = 1", "expected a name"),
    ("train x{0 of 4 5}", "expected '}'"),
])
def test_without_the_catalog_the_hint_lists_the_expected_tokens_in_words(monkeypatch, text, hint):
    monkeypatch.setattr(syntax_errors, "CATALOG", ())
    syntax_errors._catalog_index.cache_clear()
    try:
        assert error_of(text)[1].hint == hint
    finally:
        syntax_errors._catalog_index.cache_clear()


def test_rendering_has_location_line_caret_and_hint():
    err, _ = error_of("let r = 8\nattn.qkv parallel lowrank(r=r)\n", "specs/x.ut")
    assert str(err) == (
        "specs/x.ut:2:10: error: unexpected 'parallel'\n"
        "    attn.qkv parallel lowrank(r=r)\n"
        "             ^^^^^^^^\n"
        "  hint: missing '->' between selector and placement")


def test_every_catalog_hint_is_reachable_and_distinct():
    hints = [hint for hint, _ in CATALOG]
    assert len(hints) == len(set(hints))
    assert all(examples for _, examples in CATALOG)


def test_the_missing_placement_message_names_every_registered_placement():
    from utdsl.placements import PLACEMENTS
    from utdsl.syntax_errors import CATALOG

    (label,) = [label for label, _ in CATALOG if label.startswith("expected a placement after")]
    assert label.endswith("one of " + ", ".join(PLACEMENTS))
