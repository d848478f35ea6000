"""A fast path of :func:`utdsl.parse.parse` for well-formed specs.

lark's LALR parser, its parse tree and the tree-to-AST pass cost about 0.5 ms a statement in
Python (a minute for 100,000 rules). :func:`parse_statements` reads a well-formed spec by
recursive descent, about 10 times faster, and builds exactly the AST the lark path builds: the
same nodes, the same spans (a node's span covers the text of its own production; a parenthesized
expression keeps the span of what is inside the parentheses, while the node around it extends
over them, as lark's ``propagate_positions`` does), the same keyword rules (a statement keyword
only starts a statement; ``true``/``false`` only in a value; ``of`` only after a chunk).

It never reports anything: on whatever it does not recognise (a syntax error, an integer too long
to convert, nesting too deep, or syntax it was not taught) it returns None, and ``parse`` runs the
lark parser, which stays the reference of the language (``grammar/utdsl.lark``) and the only
source of syntax errors. New syntax in the grammar therefore goes to lark until it is taught here;
a change of what accepted text means must be made here too, and ``tests/test_parse_fast.py``
(both paths on the library, tricky cases and generated specs, spans included) fails until it is.
"""

from __future__ import annotations

import re

from . import syntax as ast
from .errors import Source, Span
from .parse import _chunk_index, _unescape as _unescape_escapes

__all__ = ["parse_statements"]

_WS = re.compile(r"[\t ]*")
_NL = re.compile(r"(?:\r?\n[\t ]*|#[^\n]*)+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"[0-9]+")
_FLOAT = re.compile(r"(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+")
_STRING = re.compile(r'"(?:[^"\\\n]|\\[^\n])*"')
_ROLE = re.compile(r"@[A-Za-z_][A-Za-z0-9_]*")
_STATEMENT_KEYWORDS = frozenset({"spec", "let", "use", "tuner", "train", "freeze"})
_BREAKS = frozenset("\r\n#")
_BLANKS = frozenset(" \t\r\n#")
_DEPTH = {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}


class _Decline(Exception):
    """Not a text this parser reads: the lark path takes over."""


def parse_statements(text: str, source: Source) -> tuple | None:
    """The statements of ``text`` as the lark path builds them, or None (see the module docstring)."""
    try:
        return _Reader(text, source).spec()
    except (_Decline, RecursionError, ValueError):  # ValueError: an integer too long to convert
        return None


class _Reader:
    """Recursive descent over ``text``; ``i`` is the offset, ``line``/``start`` the current line
    and the offset it starts at, ``depth`` the bracket nesting (newlines inside brackets are
    blanks)."""

    def __init__(self, text: str, source: Source):
        self.text, self.n, self.source = text, len(text), source
        self.i, self.line, self.start, self.depth = 0, 1, 0, 0

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

    # ---- statements ---------------------------------------------------------------------------

    def spec(self) -> tuple:
        statements = []
        self.skip()
        self.i = self.newlines(self.i)
        while True:
            if self.skip() == "" and self.i >= self.n:
                return tuple(statements)
            statements.append(self.statement())
            self.skip()
            if self.i >= self.n:
                return tuple(statements)
            after = self.newlines(self.i)
            if after == self.i:
                raise _Decline
            self.i = after

    def statement(self):
        self.skip()
        match = _NAME.match(self.text, self.i)
        if match is not None and match.group() in _STATEMENT_KEYWORDS:
            begin = self.line, self.i - self.start + 1
            self.i = match.end()
            return getattr(self, "s_" + match.group())(begin)
        selector = self.selector()
        self.skip()
        if not self.text.startswith("->", self.i):
            raise _Decline
        self.i += 2
        self.skip()
        placement, p_begin, p_end = self.token(_NAME)
        call = self.tuner_call()
        return ast.Rule(selector, placement, call, Span(selector.span.line, selector.span.column,
                                                        call.span.end_line, call.span.end_column, self.source),
                        self.span(p_begin, p_end))

    def s_spec(self, begin):
        self.skip()
        name, _, end = self.token(_NAME)
        description = ""
        if self.skip() == '"':
            raw, _, end = self.token(_STRING)
            description = _unescape(raw)
        return ast.Header(name, description, self.span(begin, end))

    def s_let(self, begin):
        self.skip()
        name, _, _ = self.token(_NAME)
        self.punct("=")
        value, _, end = self.expr()
        return ast.Let(name, value, self.span(begin, end))

    def s_use(self, begin):
        self.skip()
        raw, s_begin, end = self.token(_STRING)
        return ast.Use(_unescape(raw), self.span(begin, end), self.span(s_begin, end))

    def s_tuner(self, begin):
        self.skip()
        name, n_begin, n_end = self.token(_NAME)
        self.punct("=")
        call = self.tuner_call()
        return ast.Declare(name, call, self.span(begin, (call.span.end_line, call.span.end_column)),
                           self.span(n_begin, n_end))

    def s_train(self, begin, kind=ast.Train):
        self.skip()
        selector = self.selector()
        return kind(selector, self.span(begin, (selector.span.end_line, selector.span.end_column)))

    def s_freeze(self, begin):
        return self.s_train(begin, ast.Freeze)

    def tuner_call(self) -> ast.TunerCall:
        self.skip()
        name, begin, end = self.token(_NAME)
        name_span = self.span(begin, end)
        args = []
        if self.skip() == "(":
            self.punct("(")
            while self.skip() != ")":
                arg_name, a_begin, a_end = self.token(_NAME)
                self.punct("=")
                value, _, v_end = self.expr()
                args.append(ast.Arg(arg_name, value, self.span(a_begin, v_end)))
                if self.skip() != ",":
                    break
                self.punct(",")
            _, end = self.punct(")")
        return ast.TunerCall(name, tuple(args), self.span(begin, end), name_span)

    # ---- selectors ----------------------------------------------------------------------------

    def selector(self) -> ast.Selector:
        paths = [self.path()]
        while self.skip() == "|":
            self.punct("|")
            paths.append(self.path())
        first, last = paths[0].span, paths[-1]
        end = last.chunks.span if last.chunks is not None else last.span
        return ast.Selector(tuple(paths), Span(first.line, first.column, end.end_line, end.end_column, self.source))

    def path(self) -> ast.Path:
        """One alternative of a selector, with its chunks (``{q, v}``) if any."""
        char = self.skip()
        role, run, rooted = None, None, char == "^"
        if char == "@":
            name, begin, end = self.token(_ROLE)
            role, segments = name[1:], []
            while self.skip() == ".":
                self.i += 1
                segment = self.segment()
                segments.append(segment)
                end = (segment.span.end_line, segment.span.end_column)
            segments, rooted = tuple(segments), True
        else:
            if rooted:
                begin, _ = self.punct("^")
            segments = self.segments()
            first, last = segments[0].span, segments[-1].span
            begin = begin if rooted else (first.line, first.column)
            end = (last.end_line, last.end_column)
            if self.skip() == "(":
                run = self.run()
                end = (run.span.end_line, run.span.end_column)
        chunks = self.chunks() if self.skip() == "{" else None
        return ast.Path(segments, self.span(begin, end), rooted, role, chunks, run)

    def segments(self) -> tuple:
        segments = [self.segment()]
        while self.skip() == ".":
            self.i += 1
            segments.append(self.segment())
        return tuple(segments)

    def segment(self):
        char = self.skip()
        if char == "*":
            begin = self.at()
            width = 2 if self.text.startswith("**", self.i) else 1
            self.i += width
            span = self.span(begin, (begin[0], begin[1] + width))
            return ast.GlobStar(span) if width == 2 else ast.Star(span)
        if char == "(":
            begin, _ = self.punct("(")
            paths = [self.subpath()]
            while self.skip() == "|":
                self.punct("|")
                paths.append(self.subpath())
            _, end = self.punct(")")
            return ast.Group(tuple(paths), self.span(begin, end))
        text, i = self.text, self.i
        match = (_INT if "0" <= char <= "9" else _NAME).match(text, i)
        if match is None:
            raise _Decline
        end = self.i = match.end()
        line, column = self.line, i - self.start + 1
        after = text[end] if end < self.n else ""
        if (after == "[" or after in _BLANKS and self.skip() == "[") and char > "9":
            indices, last = self.indices()
            return ast.Name(text[i:end], Span(line, column, last[0], last[1], self.source), indices)
        return ast.Name(text[i:end], Span(line, column, line, column + end - i, self.source), ())

    def subpath(self) -> ast.Path:
        segments = self.segments()
        first, last = segments[0].span, segments[-1].span
        return ast.Path(segments, Span(first.line, first.column, last.end_line, last.end_column, self.source))

    def indices(self):
        self.punct("[")
        ranges = []
        while True:
            char = self.skip()
            start = stop = None
            begin = end = None
            if "0" <= char <= "9":
                digits, begin, end = self.token(_INT)
                start = int(digits)
            if self.skip() == ":":
                colon, end = self.punct(":")
                begin = begin or colon
                if "0" <= self.skip() <= "9":
                    digits, _, end = self.token(_INT)
                    stop = int(digits)
                ranges.append(ast.IndexRange(start, stop, False, self.span(begin, end)))
            elif begin is None:
                raise _Decline
            else:
                ranges.append(ast.IndexRange(start, None, True, self.span(begin, end)))
            if self.skip() != ",":
                break
            self.punct(",")
        _, end = self.punct("]")
        return tuple(ranges), end

    def chunks(self) -> ast.Chunks:
        begin, _ = self.punct("{")
        labels, count = [], None
        while True:
            char = self.skip()
            label, _, _ = self.token(_INT if "0" <= char <= "9" else _NAME)
            labels.append(label)
            char = self.skip()
            if char == ",":
                self.punct(",")
                continue
            if char != "}":
                if self.word() != "of":
                    raise _Decline
                self.i += 2
                self.skip()
                digits, _, _ = self.token(_INT)
                count = int(digits)
            break
        _, end = self.punct("}")
        indices = tuple(_chunk_index(label) for label in labels)
        if count is None:
            count = 0 if any(label.isdigit() for label in labels) else 3
        return ast.Chunks(tuple(labels), indices, count, self.span(begin, end))

    def run(self) -> ast.Run:
        begin, _ = self.punct("(")
        start = self.run_end()
        self.skip()
        if self.text.startswith("..<", self.i):
            inclusive, self.i = False, self.i + 3
        elif self.text.startswith("..", self.i):
            inclusive, self.i = True, self.i + 2
        else:
            raise _Decline
        stop = self.run_end()
        _, end = self.punct(")")
        return ast.Run(start, stop, inclusive, self.span(begin, end))

    def run_end(self) -> str:
        char = self.skip()
        return self.token(_INT if "0" <= char <= "9" else _NAME)[0]

    # ---- values: (node, start, end of the text it takes, parentheses included) -----------------

    def expr(self):
        left, begin, end = self.product()
        while True:
            op = self.skip()
            if op != "+" and op != "-":
                return left, begin, end
            self.i += 1
            right, _, end = self.product()
            left = ast.BinOp(op, left, right, self.span(begin, end))

    def product(self):
        left, begin, end = self.unary()
        while True:
            op = self.skip()
            if op != "*" and op != "/":
                return left, begin, end
            self.i += 1
            right, _, end = self.unary()
            left = ast.BinOp(op, left, right, self.span(begin, end))

    def unary(self):
        char = self.skip()
        if char == "-":
            begin = self.at()
            self.i += 1
            operand, _, end = self.unary()
            return ast.Neg(operand, self.span(begin, end)), begin, end
        if char == "(":
            begin, _ = self.punct("(")
            inner, _, _ = self.expr()
            _, end = self.punct(")")
            return inner, begin, end
        if char == '"':
            raw, begin, end = self.token(_STRING)
            return ast.Literal(_unescape(raw), self.span(begin, end)), begin, end
        if "0" <= char <= "9" or char == ".":
            match = _FLOAT.match(self.text, self.i)
            if match is not None:
                raw, begin, end = self.token(_FLOAT)
                return ast.Literal(float(raw), self.span(begin, end)), begin, end
            raw, begin, end = self.token(_INT)
            return ast.Literal(int(raw), self.span(begin, end)), begin, end
        name, begin, end = self.token(_NAME)
        span = self.span(begin, end)
        if name == "true" or name == "false":
            return ast.Literal(name == "true", span), begin, end
        return ast.Ref(name, span), begin, end


def _unescape(raw: str) -> str:
    return _unescape_escapes(raw) if "\\" in raw else raw[1:-1]
