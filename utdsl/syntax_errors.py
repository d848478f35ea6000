"""Syntax errors: what ``parse`` reports when lark rejects a spec, and the catalog of hints.

:func:`diagnose` turns a lark ``UnexpectedInput`` into one :class:`~utdsl.errors.Diagnostic` at
the offending token (exact line and column; for a missing end of statement, just after the last
character of the line), with a message ``unexpected ...`` and a hint, the first of:

1. a bracket problem: an opener never closed, when the error is on a later line or at the end of
   the input; a closer with nothing to close, or closing the wrong kind;
2. the hint of the :data:`CATALOG` example that fails like the spec (same LALR state, same
   acceptable tokens; one failing on the same token preferred, then on the same kind of token);
3. the tokens that would have been accepted, in words.

:data:`CATALOG` is ``(hint, examples)`` pairs; order matters, the first match wins. Examples are
first statements; each is also tried after :data:`LATER` (a statement before it), where the LALR
stack is deeper. ``tests/test_syntax_errors.py`` walks the whole catalog.
"""

from __future__ import annotations

import functools

from lark import Lark
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from .errors import Diagnostic, Source, Span

__all__ = ["CATALOG", "LATER", "diagnose"]

#: prefixed to every example to make its later-statement variant
LATER = "train head\n"

CATALOG: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("missing '->' between selector and placement", (
        "attn.qkv parallel lowrank(r=8)",
        "attn parallel lowrank",
        "blocks[0:2] parallel lowrank",
        "attn.qkv{q, v} parallel lowrank",
        "blocks.* parallel lowrank",
        "blocks.** parallel lowrank",
        "blocks.(a | b) parallel lowrank",
        "blocks.0 parallel lowrank",
        "a | b parallel lowrank",
        "attn.qkv = parallel lowrank",
        "attn.qkv - parallel lowrank",
    )),
    ("a rule is SELECTOR -> PLACEMENT TUNER(ARGS); to train parameters write 'train SELECTOR'", (
        "attn.qkv\n",
        "attn.qkv{q}\n",
        "blocks[0:2]\n",
        "blocks.*\n",
        "blocks.**\n",
        "blocks.0\n",
    )),
    ("a rule starts with a selector, e.g. 'blocks.*.attn -> parallel lowrank(r=8)'", (
        "-> parallel lowrank",
    )),
    ("expected a placement after '->': one of parallel, sequential, prompt, prefix, weight, side", (
        "attn ->\n",
        "attn -> (r=8)",
        "attn -> \"parallel\" lowrank",
    )),
    ("expected a tuner name after the placement: '-> PLACEMENT TUNER(ARGS)', "
     "e.g. '-> parallel lowrank(r=8)'", (
        "attn -> parallel\n",
        "attn -> parallel(r=8)",
        "attn -> lowrank(r=8)",
    )),
    ("tuner arguments must be name=value", (
        "attn -> parallel lowrank(8)",
        "attn -> parallel lowrank(r=8, 16)",
        "attn -> parallel lowrank(\"r\"=8)",
        "attn -> parallel lowrank(r)",
        "attn -> parallel lowrank(r=8, alpha)",
        "attn -> parallel lowrank(r 8)",
        "attn -> parallel lowrank(r=8, alpha 16)",
        "attn -> parallel lowrank(r: 8)",
        "attn -> parallel lowrank(r=8, alpha: 16)",
        "attn -> parallel lowrank(r=8, alpha=1, 16)",
        "attn -> parallel lowrank(r=8, alpha=1, dropout)",
        "attn -> parallel lowrank(r=8, alpha=1, dropout 0)",
    )),
    ("missing ',' between arguments", (
        "attn -> parallel lowrank(r=8 alpha=16)",
        "attn -> parallel lowrank(r=8, alpha=16 dropout=0.1)",
        "attn -> parallel lowrank(r=\"a\" alpha=16)",
        "attn -> parallel lowrank(r=true alpha=16)",
        "attn -> parallel lowrank(r=x alpha=16)",
        "attn -> parallel lowrank(r=1.5 alpha=16)",
    )),
    ("missing value after '='", (
        "attn -> parallel lowrank(r=)",
        "attn -> parallel lowrank(r=, alpha=1)",
        "attn -> parallel lowrank(r=8, alpha=)",
        "let r =\n",
    )),
    ("one statement per line", (
        "attn -> parallel lowrank(r=8) train head",
        "attn -> parallel lowrank train head",
        "train head freeze x",
        "let r = 8 let a = 1",
        "let r = x y",
        "use \"a.ut\" use \"b.ut\"",
        "spec a \"b\" let r = 1",
    )),
    ("expected a value: a number, \"string\", true/false, a name, or arithmetic on them", (
        "let r = * 2",
        "let r = 2 * *",
        "let r = 2 +\n",
        "let r = ,",
        "attn -> parallel lowrank(r=*2)",
        "attn -> parallel lowrank(r=2 * )",
        "attn -> parallel lowrank(r=2 + )",
        "let r = (2 + )",
        "let r = ()",
    )),
    ("expected an operator (+ - * /) or the end of the statement", (
        "let r = 8 9",
        "let r = 8 \"a\"",
        "let r = (8 9)",
        "attn -> parallel lowrank(r=(8 9))",
    )),
    ("a value in parentheses needs its ')'", (
        "let r = (1, 2)",
        "attn -> parallel lowrank(r=(1, alpha=2)",
    )),
    ("'let' needs a name and '= value', e.g. 'let r = 8'", (
        "let = 3",
        "let r 3",
        "let r\n",
        "let 3 = r",
        "let\n",
        "let r == 3",
        "let \"r\" = 3",
    )),
    ("expected a selector segment after '.'", (
        "blocks. -> parallel lowrank",
        "train blocks.\n",
        "blocks.(a.) -> parallel lowrank",
        "blocks.(a. | b) -> parallel lowrank",
    )),
    ("empty selector segment (two dots)", (
        "blocks..attn -> parallel lowrank",
        "train blocks..attn",
        "blocks.(a..b) -> parallel lowrank",
    )),
    ("selector segments are names, numbers, '*', '**' or '(a | b)'", (
        "blocks.\"attn\" -> parallel lowrank",
        "blocks.-1 -> parallel lowrank",
        "train blocks.^attn",
        "^.attn -> parallel lowrank",
        "^^attn -> parallel lowrank",
    )),
    ("'|' needs a path on both sides", (
        "attn | -> parallel lowrank",
        "| attn -> parallel lowrank",
        "blocks.(attn |) -> parallel lowrank",
        "blocks.(| attn) -> parallel lowrank",
        "train attn |\n",
        "attn || mlp -> parallel lowrank",
    )),
    ("a group is '(a | b.c)', e.g. 'blocks.*.(attn | mlp)'", (
        "blocks.() -> parallel lowrank",
        "blocks.(attn mlp) -> parallel lowrank",
        "blocks.(attn, mlp) -> parallel lowrank",
        "blocks.(attn | mlp -> parallel lowrank",
        "blocks.(attn | mlp{q}) -> parallel lowrank",
    )),
    ("indices look like [3], [0:6], [:2] or [0:2, 5] (non-negative integers)", (
        "blocks[] -> parallel lowrank",
        "blocks[a] -> parallel lowrank",
        "blocks[-1] -> parallel lowrank",
        "blocks[0:-1] -> parallel lowrank",
        "blocks[0:2:1] -> parallel lowrank",
        "blocks[0 2] -> parallel lowrank",
        "blocks[0:2 5] -> parallel lowrank",
        "blocks[0,] -> parallel lowrank",
        "blocks[1.5] -> parallel lowrank",
    )),
    ("only names take indices, e.g. 'blocks[0:6]'", (
        "*[0] -> parallel lowrank",
        "**[0] -> parallel lowrank",
        "blocks.0[1] -> parallel lowrank",
        "(a | b)[0] -> parallel lowrank",
    )),
    ("chunks look like {q, v} or {0, 2 of 4}", (
        "attn.qkv{} -> parallel lowrank",
        "attn.qkv{q v} -> parallel lowrank",
        "attn.qkv{0, 2 of} -> parallel lowrank",
        "attn.qkv{0 of 4, 2} -> parallel lowrank",
        "attn.qkv{q,} -> parallel lowrank",
        "attn.qkv{of 3} -> parallel lowrank",
        "attn.qkv{\"q\"} -> parallel lowrank",
        "attn.qkv{0, 2 of x} -> parallel lowrank",
    )),
    ("chunks end a path: 'a.qkv{q, v} | b'", (
        "attn.qkv{q}.x -> parallel lowrank",
        "attn.qkv{q}{v} -> parallel lowrank",
    )),
    ("'spec' takes a name and a quoted description, e.g. spec lora \"LoRA on q and v\"", (
        "spec \"lora\"",
        "spec lora description",
        "spec\n",
        "spec lora \"a\" \"b\"",
        "spec 3",
    )),
    ("'use' takes a quoted file or library name, e.g. use \"lora.ut\"", (
        "use lora",
        "use\n",
        "use 3",
    )),
    ("'train' and 'freeze' take a selector, e.g. 'train **.bias'", (
        "train\n",
        "freeze\n",
        "train -> parallel lowrank",
        "train \"head\"",
        "freeze = 1",
    )),
    ("after the selector of 'train'/'freeze' the line ends (missing '.' between segments?)", (
        "train head x",
        "train ** bias",
        "train blocks[0:2] **",
        "train blocks.* x",
        "train blocks.0 x",
        "train (a | b) x",
        "freeze head x",
        "train head \"x\"",
    )),
    ("'train' and 'freeze' take no placement or tuner: 'train SELECTOR'", (
        "train head -> parallel lowrank",
        "freeze head -> parallel lowrank",
        "train blocks.*.attn -> parallel lowrank",
    )),
    ("tuner arguments go in parentheses after the tuner name: 'lowrank(r=8)'", (
        "attn -> parallel lowrank r=8",
        "attn -> parallel lowrank[r=8]",
        "attn -> parallel lowrank{r=8}",
        "attn -> parallel lowrank 8",
    )),
)


# ---- reporting ---------------------------------------------------------------------------------

_CLOSE = {"RPAR", "RSQB", "RBRACE"}
_PAIRS = {"(": ")", "[": "]", "{": "}"}
_WORDS = {"NAME": "a name", "INT": "an integer", "FLOAT": "a number", "STRING": "a string", "ROLE": "a role (@classifier)",
          "_NL": "end of line", "$END": "end of input"}


def _word(terminal: str, parser: Lark) -> str:
    if terminal in _WORDS:
        return _WORDS[terminal]
    pattern = parser.get_terminal(terminal).pattern
    return f"'{pattern.value}'" if pattern.type == "str" else terminal.lower()


def _expected(terminals: set[str], parser: Lark) -> str:
    """``expected one of ...``: keywords, then names and literals, then punctuation, then the
    end of the line, in words."""
    def rank(terminal: str) -> tuple[int, str]:
        word = _word(terminal, parser)
        group = 3 if terminal in ("_NL", "$END") else 1 if terminal in _WORDS else 2
        return (0 if group == 2 and word.strip("'").isalpha() else group), word

    words = [_word(t, parser) for t in sorted(terminals, key=rank)]
    return "expected " + (words[0] if len(words) == 1 else "one of " + ", ".join(words))


def diagnose(err: UnexpectedInput, source: Source, parser: Lark) -> Diagnostic:
    """The diagnostic for lark's error ``err`` parsing ``source`` with ``parser``."""
    text = source.text
    if isinstance(err, UnexpectedToken):
        token = err.token
        if token.type == "_NL" and not token.value:
            message, line, column = "unexpected end of input", token.end_line, token.end_column
            offset = len(text)
        elif token.type in ("_NL", "$END"):
            # point just after the last character of the line, not at a comment that follows
            offset = token.start_pos
            while offset > 0 and text[offset - 1] in " \t":
                offset -= 1
            message, line = "unexpected end of line", token.line
            column = token.column - (token.start_pos - offset)
        else:
            shown = f"string {token}" if token.type == "STRING" else f"'{token}'"
            message, line, column, offset = f"unexpected {shown}", token.line, token.column, token.start_pos
        width = len(token) if token.type not in ("_NL", "$END") and token.line == token.end_line else 1
        hint = (_bracket_hint(text, offset, line, token.type)
                or _catalog_hint(err, parser) or _expected(_accepts(err), parser))
    else:
        char = err.char if isinstance(err, UnexpectedCharacters) else ""
        message = f"unexpected character {char!r}" if char else "unexpected input"
        line, column, width = err.line, err.column, 1
        hint = _CHAR_HINTS.get(char) or _expected(_accepts(err), parser)
    span = Span(line, column, line, column + width, source)
    return Diagnostic(message, span, hint)


def _accepts(err: UnexpectedInput) -> set[str]:
    """The terminals the parser would have taken at the error (exact, unlike LALR lookaheads)."""
    if getattr(err, "interactive_parser", None) is not None:
        return set(err.interactive_parser.accepts())
    return set(getattr(err, "expected", None) or getattr(err, "allowed", None) or ())


_CHAR_HINTS = {
    '"': "unterminated string: a string ends with '\"' on the same line",
    "'": "strings are written with double quotes: \"...\"",
}


def _bracket_hint(text: str, offset: int, line: int, token_type: str) -> str | None:
    """A hint when the error is due to a bracket: one open at ``offset`` and never closed (when
    the error is on a later line, or at the end), or a closer with nothing, or another, to close."""
    stack: list[tuple[str, int]] = []  # (bracket, offset) of the open brackets
    at_error, i = None, 0
    while i < len(text):
        if i == offset:
            at_error = list(stack)
        c = text[i]
        if c == "#":  # a comment, to the end of the line
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        if c == '"':  # a string, to its end or the end of the line
            i += 1
            while i < len(text) and text[i] not in '"\n':
                i += 2 if text[i] == "\\" else 1
        elif c in _PAIRS:
            stack.append((c, i))
        elif stack and _PAIRS[stack[-1][0]] == c:
            stack.pop()
        i += 1
    at_error = stack if at_error is None else at_error
    for bracket, opened in reversed(at_error):
        opened_line = text.count("\n", 0, opened) + 1
        if (bracket, opened) in stack and (line > opened_line or offset >= len(text)):
            column = opened - text.rfind("\n", 0, opened)
            return f"unclosed '{bracket}' (opened at line {opened_line}, column {column})"
    if token_type in _CLOSE:
        if not at_error:
            return f"unmatched '{text[offset]}'"
        if _PAIRS[at_error[-1][0]] != text[offset]:
            return f"'{text[offset]}' does not close '{at_error[-1][0]}'"
    return None


@functools.cache
def _catalog_index(parser: Lark) -> dict[object, list[tuple[str, str, str]]]:
    """(state, acceptable tokens) and (acceptable tokens) -> [(token type, token text, hint)]."""
    index: dict[object, list[tuple[str, str, str]]] = {}
    for label, examples in CATALOG:
        for example in (*examples, *(LATER + example for example in examples)):
            try:
                parser.parse(example)
            except UnexpectedToken as err:
                accepts = frozenset(err.accepts)
                for key in ((err.state.position, accepts), accepts):
                    index.setdefault(key, []).append((err.token.type, str(err.token), label))
            except UnexpectedInput:
                pass
    return index


def _catalog_hint(err: UnexpectedToken, parser: Lark) -> str | None:
    """The hint of the catalog example that fails most like ``err``.

    Candidates fail in the same LALR state with the same acceptable tokens or, failing that, in
    any state with the same acceptable tokens (after a number or after a name, say). Of those,
    the first failing on the same token wins, else the first on a token of the same type, else
    the first. This is the rule of lark's ``UnexpectedInput.match_examples``, generalized: it
    ignores the stack depth, so that one example covers a mistake at any nesting depth (an
    argument, a parenthesized expression), and falls back on the acceptable tokens alone. It is
    a dictionary lookup, not a parse per example, and avoids a lark 1.3 bug (``match_examples``
    raises TypeError formatting a debug message when an example reaches the same state with
    other acceptable tokens).
    """
    if err.state is None or err.interactive_parser is None:
        return None
    index, accepts = _catalog_index(parser), frozenset(err.accepts)
    token = (err.token.type, str(err.token))
    for key in ((err.state.position, accepts), accepts):
        candidates = index.get(key, [])
        if candidates:
            return min(candidates, key=lambda c: (c[:2] != token, c[0] != token[0]))[2]  # first of best
    return None
