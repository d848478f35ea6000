"""A fast path of :func:`utdsl.parse.parse` for well-formed specs.

lark's LALR parser, its parse tree and the tree-to-AST pass cost about 0.5 ms a statement in
Python (a minute for 100,000 rules). :func:`parse_statements` reads a well-formed spec by
recursive descent, about 10 times faster, and builds exactly the AST the lark path builds: the
same nodes, the same spans (a node's span covers the text of its own production; a parenthesized
expression keeps the span of what is inside the parentheses, while the node around it extends
over them, as lark's ``propagate_positions`` does), the same keyword rules (a statement keyword
only starts a statement; ``true``/``false`` only in a value; ``of`` only after a chunk).

The usual layouts are read in big steps, as most of a large spec is a few of them repeated: the
head of a rule whose selector is a plain dotted path (``stage0.blocks.3.attn{q, v} -> parallel
lowrank``) is one regular-expression match, and an argument, index or chunk list on one line is
read once per distinct text, by a reader over that text alone (:meth:`utdsl.parse_scan._Scanner.once`),
then placed where each copy stands (its columns shifted): on one line, a text reads the same
wherever it is.
Anything else is read token by token.

It never reports anything: on whatever it does not recognise (a syntax error, an integer too long
to convert, nesting too deep, or syntax it was not taught) it returns None, and ``parse`` runs the
lark parser, which stays the reference of the language (``grammar/utdsl.lark``) and the only
source of syntax errors. New syntax in the grammar therefore goes to lark until it is taught here;
a change of what accepted text means must be made here too, and ``tests/test_parse_fast.py``
(both paths on the library, tricky cases and generated specs, spans included) fails until it is.
"""

from __future__ import annotations

from . import syntax as ast
from .errors import Source, Span
from .parse import _chunk_index
from .parse_scan import (_ARGS, _ARROW_CALL, _BLANKS, _CHUNKS, _DOTTED, _FLOAT, _INDICES, _INT, _NAME,
                         _PLAIN_RULE, _ROLE, _STATEMENT_KEYWORDS, _STRING, _WS, _Decline, _Scanner,
                         _dotted_segments, _moved, _next_char, _unescape)

__all__ = ["parse_statements"]


def parse_statements(text: str, source: Source) -> tuple | None:
    """The statements of ``text`` as the lark path builds them, or None (see the module docstring)."""
    try:
        return _Reader(text, source).spec()
    except (_Decline, RecursionError, ValueError):  # ValueError: an integer too long to convert
        return None


class _Reader(_Scanner):
    """Recursive descent over ``text`` (the grammar; the lexical layer is :class:`_Scanner`)."""

    # ---- statements ---------------------------------------------------------------------------

    def spec(self) -> tuple:
        text, n, statements = self.text, self.n, []
        self.i = self.newlines(_WS.match(text, 0).end())
        while self.i < n:
            statements.append(self.statement())
            end = _WS.match(text, self.i).end()
            if end >= n:
                break
            if text[end] == "\n" and text[end + 1:end + 2] not in _BLANKS:  # the usual: one newline
                self.i = self.start = end + 1
                self.line += 1
                continue
            self.i = self.newlines(end)
            if self.i == end:  # not the end of a statement
                raise _Decline
        return tuple(statements)

    def statement(self):
        match = _NAME.match(self.text, self.i)
        if match is not None and match.group() in _STATEMENT_KEYWORDS:
            begin = self.line, self.i - self.start + 1
            self.i = match.end()
            return getattr(self, "s_" + match.group())(begin)
        return self.rule()

    def rule(self) -> ast.Rule:
        """``SELECTOR -> PLACEMENT TUNER(ARGS)``. The arrow and both names are one match, and so is
        the whole head of a rule whose selector is a plain dotted path (``stage0.blocks.3.attn``)."""
        text, i, line, start, source = self.text, self.i, self.line, self.start, self.source
        match = _PLAIN_RULE.match(text, i)
        if match is not None:
            segments = _dotted_segments(match.group(1), line, i - start + 1, source)
            span = Span(line, i - start + 1, line, match.end(1) - start + 1, source)
            if match.start(2) < 0:
                selector = ast.Selector((ast.Path(tuple(segments), span),), span)  # one Span serves both
            else:
                chunks = self.cached_chunks(match.group(2), line, match.start(2) - start + 1)
                selector = ast.Selector((ast.Path(tuple(segments), span, chunks=chunks),),
                                        Span(line, span.column, line, chunks.span.end_column, source))
            first = 3
        else:
            selector = self.selector()
            self.skip()
            match = _ARROW_CALL.match(text, self.i)
            if match is None:
                raise _Decline
            line, start, span, first = self.line, self.start, selector.span, 1
        placement, name = match.group(first, first + 1)
        placement_span = Span(line, match.start(first) - start + 1, line, match.end(first) - start + 1, source)
        self.i = match.end()
        call = self.call_rest(name, line, match.start(first + 1) - start + 1)
        return ast.Rule(selector, placement, call,
                        Span(span.line, span.column, call.span.end_line, call.span.end_column, source),
                        placement_span)

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
        match = _NAME.match(self.text, self.i)
        if match is None:
            raise _Decline
        self.i = match.end()
        return self.call_rest(match.group(), self.line, match.start() - self.start + 1)

    def call_rest(self, name: str, line: int, column: int) -> ast.TunerCall:
        """The tuner call whose name (at ``line``, ``column``) was just read: its arguments."""
        name_span = Span(line, column, line, column + len(name), self.source)
        if self.skip() != "(":
            return ast.TunerCall(name, (), name_span, name_span)  # one span for both: they are equal
        match = _ARGS.match(self.text, self.i)
        if match is not None:
            line, base, source = self.line, match.start() - self.start, self.source
            args = tuple([ast.Arg(name, _moved(value, line, base, source),
                                  Span(line, base + begin, line, base + end, source))
                          for name, value, begin, end in self.once(_arg_templates, match.group())])
            self.i, end = match.end(), (line, base + len(match.group()) + 1)  # after the `)`
        else:
            args, end = self.args()
        return ast.TunerCall(name, args, self.span((line, column), end), name_span)

    def args(self) -> tuple[tuple, tuple[int, int]]:
        """``(ARG, ...)`` token by token: the arguments and the end of the ``)``."""
        self.punct("(")
        args = []
        while self.skip() != ")":
            name, begin, _ = self.token(_NAME)
            self.punct("=")
            value, _, end = self.expr()
            args.append(ast.Arg(name, value, self.span(begin, end)))
            if self.skip() != ",":
                break
            self.punct(",")
        return tuple(args), self.punct(")")[1]

    # ---- selectors ----------------------------------------------------------------------------

    def selector(self) -> ast.Selector:
        paths = [self.path()]
        while self.skip() == "|":
            self.punct("|")
            paths.append(self.path())
        first, last = paths[0].span, paths[-1]
        if len(paths) == 1 and last.chunks is None:
            return ast.Selector((last,), first)  # the same span: one immutable Span serves both
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
        segments = self.dotted()
        while self.skip() == ".":
            self.i += 1
            segments.append(self.segment())
        return tuple(segments)

    def dotted(self) -> list:
        """Segments: a dotted run without blanks (``stage0.blocks.3.attn``) with one match, else
        the first segment alone (by ``segment``); ``segments`` reads on."""
        char = self.skip()
        text, i = self.text, self.i
        match = _DOTTED.match(text, i) if char != "(" else None
        if match is None:
            return [self.segment()]
        run, end = match.group(), match.end()
        head, _, last = run.rpartition(".")
        after = text[end] if end < self.n else ""
        if last[0] > "9" and (after == "[" or after in _BLANKS and (self.depth or _next_char(text, end) == "[")):
            # a last name that may take indices (`blocks[0:6]`, `blocks [0]`): `segment` reads it
            segments = _dotted_segments(head, self.line, i - self.start + 1, self.source) if head else []
            self.i = end - len(last)
            segments.append(self.segment())
            return segments
        self.i = end
        return _dotted_segments(run, self.line, i - self.start + 1, self.source)

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
        match = _INDICES.match(self.text, self.i)
        if match is None:
            return self.read_indices()
        line, base, source = self.line, match.start() - self.start, self.source
        self.i = match.end()
        return tuple([ast.IndexRange(start, stop, single, Span(line, base + begin, line, base + end, source))
                      for start, stop, single, begin, end in self.once(_index_templates, match.group())]), \
            (line, base + len(match.group()) + 1)  # after the `]`

    def read_indices(self):
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
        match = _CHUNKS.match(self.text, self.i)
        if match is None:
            return self.read_chunks()
        self.i = match.end()
        return self.cached_chunks(match.group(), self.line, match.start() - self.start + 1)

    def cached_chunks(self, text: str, line: int, column: int) -> ast.Chunks:
        """The chunks written ``text`` (a ``_CHUNKS`` match) at ``line``, ``column``."""
        return ast.Chunks(*self.once(_chunk_parts, text), Span(line, column, line, column + len(text), self.source))

    def read_chunks(self) -> ast.Chunks:
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


# Readings for `_Scanner.once`: what a text alone gives, its columns counted from its first character
# (column 1); at offset `base` from the start of a line, column c is column `base + c` of the line.

def _arg_templates(reader: _Reader) -> tuple:
    """``(name, value, start column, end column)`` of each argument of ``(...)``."""
    args, _ = reader.args()
    return tuple((arg.name, arg.value, arg.span.column, arg.span.end_column) for arg in args)


def _index_templates(reader: _Reader) -> tuple:
    """``(start, stop, single, start column, end column)`` of each range of ``[...]``."""
    ranges, _ = reader.read_indices()
    return tuple((r.start, r.stop, r.single, r.span.column, r.span.end_column) for r in ranges)


def _chunk_parts(reader: _Reader) -> tuple:
    """The labels, indices and count of ``{...}``."""
    chunks = reader.read_chunks()
    return chunks.labels, chunks.indices, chunks.count
