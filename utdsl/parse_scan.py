"""The lexical layer of :mod:`utdsl.parse_fast`: its token patterns and :class:`_Scanner`, which
keeps the offset, line and bracket depth, skips blanks and comments, reads tokens with their
positions, and reads a one-line text once per distinct text (:meth:`_Scanner.once`); plus the
helpers that build AST pieces from matched text. The grammar is read by ``parse_fast._Reader``, a
subclass; both decline (:class:`_Decline`) whatever they do not recognise.
"""

from __future__ import annotations

import re
from itertools import accumulate

from . import syntax as ast
from .errors import Source, Span
from .parse import _unescape as _unescape_escapes

_NAME_TEXT = r"[A-Za-z_][A-Za-z0-9_]*"
_FLOAT_TEXT = r"(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+"
_STRING_TEXT = r'"(?:[^"\\\n]|\\[^\n])*"'
_SEGMENT_TEXT = rf"(?:{_NAME_TEXT}|[0-9]+|\*\*?)"

_WS = re.compile(r"[\t ]*")
_NL = re.compile(r"(?:\r?\n[\t ]*|#[^\n]*)+")
_NAME = re.compile(_NAME_TEXT)
_INT = re.compile(r"[0-9]+")
_FLOAT = re.compile(_FLOAT_TEXT)
_STRING = re.compile(_STRING_TEXT)
_ROLE = re.compile(r"@[A-Za-z_][A-Za-z0-9_]*")
# Runs of tokens read with one match (the usual layout); anything else is read token by token.
_DOTTED_TEXT = rf"{_SEGMENT_TEXT}(?:\.{_SEGMENT_TEXT})*"                    # stage0.blocks.3.attn
_DOTTED = re.compile(_DOTTED_TEXT)
_ARROW_CALL = re.compile(rf"->[ \t]*({_NAME_TEXT})[ \t]+({_NAME_TEXT})")  # -> parallel lowrank
_CHUNKS_TEXT = r"\{[^{}\n#]*\}"                                          # {q, v} on one line
_CHUNKS = re.compile(_CHUNKS_TEXT)
_PLAIN_RULE = re.compile(rf"({_DOTTED_TEXT})[ \t]*({_CHUNKS_TEXT})?[ \t]*{_ARROW_CALL.pattern}")
_ARGS = re.compile(rf'\((?:[^()"\n#]|{_STRING_TEXT})*\)')                    # (r=r, alpha=2 * r)
_INDICES = re.compile(r"\[[^\[\]\n#]*\]")                                 # [0:6, 8] on one line
_STATEMENT_KEYWORDS = frozenset({"spec", "let", "use", "tuner", "train", "freeze"})
_BREAKS = frozenset("\r\n#")
_BLANKS = frozenset(" \t\r\n#")
_DEPTH = {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}


class _Decline(Exception):
    """Not a text this parser reads: the lark path takes over."""


class _Scanner:
    """Where a reading stands in ``text``: ``i`` is the offset, ``line``/``start`` the current line
    and the offset it starts at, ``depth`` the bracket nesting (newlines inside brackets are
    blanks), ``read_before`` what :meth:`once` read."""

    def __init__(self, text: str, source: Source):
        self.text, self.n, self.source = text, len(text), source
        self.i, self.line, self.start, self.depth = 0, 1, 0, 0
        self.read_before: dict[tuple, tuple] = {}

    # ---- characters and tokens ----------------------------------------------------------------

    def newlines(self, i: int) -> int:
        """Past one run of newlines, indentation and comments from ``i`` (the same if none)."""
        match = _NL.match(self.text, i)
        if match is None:
            return i
        end = match.end()
        count = self.text.count("\n", i, end)
        if count:
            self.line += count
            self.start = self.text.rindex("\n", i, end) + 1
        return end

    def skip(self) -> str:
        """Skip blanks (and, inside brackets, newlines and comments); the next character or ''."""
        text, i = self.text, self.i
        char = text[i] if i < self.n else ""
        if char != " " and char != "\t" and not (self.depth and char in _BREAKS):
            return char
        i = _WS.match(text, i).end()
        if self.depth:
            while True:
                after = self.newlines(i)
                if after == i:
                    break
                i = _WS.match(text, after).end()
        self.i = i
        return text[i] if i < self.n else ""

    def at(self) -> tuple[int, int]:
        return self.line, self.i - self.start + 1

    def span(self, begin: tuple[int, int], end: tuple[int, int]) -> Span:
        return Span(begin[0], begin[1], end[0], end[1], self.source)

    def token(self, pattern: re.Pattern) -> tuple[str, tuple[int, int], tuple[int, int]]:
        """The text of ``pattern`` at the current offset, with its start and end; else decline."""
        i = self.i
        match = pattern.match(self.text, i)
        if match is None:
            raise _Decline
        end = self.i = match.end()
        line, column = self.line, i - self.start + 1
        return self.text[i:end], (line, column), (line, column + end - i)

    def punct(self, char: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """Consume the one-character token ``char`` (after blanks); its start and end."""
        if self.skip() != char:
            raise _Decline
        line, column = self.line, self.i - self.start + 1
        self.i += 1
        self.depth += _DEPTH.get(char, 0)
        return (line, column), (line, column + 1)

    def word(self) -> str | None:
        """The name at the current offset (after blanks), not consumed."""
        self.skip()
        match = _NAME.match(self.text, self.i)
        return match.group() if match else None

    def once(self, reading, text: str) -> tuple:
        """``reading(reader)`` of a reader over ``text`` alone (one line, so what it reads does not
        depend on where the text is, but for columns), once per distinct text: equal texts recur
        on many rules (``(r=r, alpha=alpha)``, ``{q, v}``, ``[0:6]``)."""
        key = (reading, text)
        parts = self.read_before.get(key)
        if parts is None:
            reader = type(self)(text, self.source)
            parts = reading(reader)
            if reader.i != len(text):
                raise _Decline
            self.read_before[key] = parts
        return parts


def _moved(value, line: int, base: int, source: Source):
    """The expression ``value`` of a text alone, for that text at offset ``base`` of ``line``."""
    span = Span(line, base + value.span.column, line, base + value.span.end_column, source)
    kind = type(value)
    if kind is ast.Ref:
        return ast.Ref(value.name, span)
    if kind is ast.Literal:
        return ast.Literal(value.value, span)
    if kind is ast.BinOp:
        left, right = _moved(value.left, line, base, source), _moved(value.right, line, base, source)
        return ast.BinOp(value.op, left, right, span)
    return ast.Neg(_moved(value.operand, line, base, source), span)


def _dotted_segments(run: str, line: int, column: int, source: Source) -> list:
    """The segments of the dotted ``run`` (a ``_DOTTED`` match) that starts at ``line``, ``column``."""
    parts = run.split(".")
    columns = accumulate([len(part) + 1 for part in parts], initial=column)
    if "*" not in run:
        return [ast.Name(part, Span(line, column, line, column + len(part), source), ())
                for part, column in zip(parts, columns)]
    segments = []
    for part, column in zip(parts, columns):
        span = Span(line, column, line, column + len(part), source)
        if part == "*":
            segments.append(ast.Star(span))
        elif part == "**":
            segments.append(ast.GlobStar(span))
        else:
            segments.append(ast.Name(part, span, ()))
    return segments


def _next_char(text: str, i: int) -> str:
    """The character after the spaces and tabs from ``i``, or ''."""
    i = _WS.match(text, i).end()
    return text[i] if i < len(text) else ""


def _unescape(raw: str) -> str:
    return _unescape_escapes(raw) if "\\" in raw else raw[1:-1]
