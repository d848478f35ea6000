"""Stage 1, parse: spec text -> :class:`~utdsl.syntax.Spec` (unchecked).

Input: the text of a spec and the path it came from (for messages). Output: a ``Spec`` of frozen
AST nodes (:mod:`utdsl.syntax`), each with a :class:`~utdsl.errors.Span` into a shared
:class:`~utdsl.errors.Source`. Statements keep their written order, ``let`` and ``use`` included;
``Rule.args`` is None (``check`` fills it). ``Spec.name``/``description`` come from the first
``spec`` header, if any.

Invariants: ``parse`` returns a Spec or raises :class:`~utdsl.errors.SpecError`, never another
exception. A syntax error has one diagnostic at the offending token (exact line and column), a
message ``unexpected ...`` and a hint: an unclosed or unmatched bracket when there is one, else the
label of the closest example in :data:`utdsl.syntax_errors.CATALOG`, else the tokens that would
have been accepted, in words. The grammar itself is ``grammar/utdsl.lark``, the language reference.

Speed: a well-formed spec is read by :mod:`utdsl.parse_fast` (the same AST, about 10 times faster
than lark); anything else, errors included, by lark. Both are linear in the text. The cyclic
garbage collector is paused while the nodes are built (:func:`utdsl.collector.collector_paused`)
and hands them to its oldest generation after (:func:`utdsl.collector.keep_as_old`).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Iterator

from dataclasses import replace
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedInput, VisitError

from . import syntax as ast
from .collector import collector_paused, keep_as_old
from .errors import Diagnostic, Source, Span, SpecError
from .syntax_errors import diagnose

__all__ = ["parse", "parser"]

_OPEN = {"LPAR", "LSQB", "LBRACE"}
_CLOSE = {"RPAR", "RSQB", "RBRACE"}


class _Newlines:
    """Post-lexer: newlines inside (), [] and {} are dropped, as are those before the first
    statement and repeated ones; one is added after the last statement."""

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth, last = 0, None
        for token in stream:
            if token.type == "_NL":
                if depth or last is None or last.type == "_NL":
                    continue
            elif token.type in _OPEN:
                depth += 1
            elif token.type in _CLOSE:
                depth = max(0, depth - 1)
            last = token
            yield token
        if last is not None and last.type != "_NL":
            yield Token.new_borrow_pos("_NL", "", last)  # empty value: the end of the input


@functools.cache
def parser() -> Lark:
    """The LALR parser of ``grammar/utdsl.lark`` (built once per process)."""
    grammar = resources.files("utdsl.grammar").joinpath("utdsl.lark")
    with resources.as_file(grammar) as path:
        return Lark.open(path.name, rel_to=str(path), parser="lalr", lexer="contextual",
                         propagate_positions=True, maybe_placeholders=True, postlex=_Newlines())


def parse(text: str, path: str = "<string>") -> ast.Spec:
    """Parse spec ``text`` (read from ``path``, used in messages) into an unchecked ``Spec``.

    Raises :class:`SpecError` on a syntax error, with one diagnostic at the offending token.
    """
    source = Source(text, path)
    from .parse_fast import parse_statements  # it uses this module's helpers

    with collector_paused():
        statements = parse_statements(text, source)
        if statements is None:
            statements = _parse_with_lark(text, source)
        keep_as_old()
    header = next((s for s in statements if isinstance(s, ast.Header)), None)
    return ast.Spec(statements, source, name=header.name if header else None,
                    description=header.description if header else "")


def _parse_with_lark(text: str, source: Source) -> tuple:
    """The statements of ``text`` by the reference parser: a SpecError on a syntax error."""
    try:
        tree = parser().parse(text)
    except UnexpectedInput as err:
        raise SpecError(diagnostics=[diagnose(err, source, parser())]) from None
    build, statements = _Build(source), []
    for statement in tree.children:
        try:
            statements.append(build.transform(statement))
        except (RecursionError, VisitError) as err:  # lark wraps what a callback raises
            if isinstance(err, VisitError) and not isinstance(err.orig_exc, RecursionError):
                raise
            build.problems.append(Diagnostic("statement nested too deeply", build._span(statement.meta)))
    if build.problems:
        raise SpecError(diagnostics=build.problems)
    return tuple(statements)


# ---- tree -> AST -----------------------------------------------------------------------------

def _unescape(raw: str) -> str:
    """The value of a STRING token: quotes removed; \\" \\\\ \\n \\t decoded, other escapes kept."""
    out, i, body = [], 0, raw[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append({'"': '"', "\\": "\\", "n": "\n", "t": "\t"}.get(body[i + 1], body[i:i + 2]))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


@v_args(meta=True)
class _Build(Transformer):
    """Builds AST nodes from the parse tree. Raises nothing itself (lark would wrap it in a
    VisitError): a problem found while building (an integer too long to convert) goes to
    ``problems``. Only Python's recursion limit can stop it, on absurdly deep nesting."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source
        self.problems: list[Diagnostic] = []

    def _span(self, node) -> Span:
        return Span(node.line, node.column, node.end_line, node.end_column, self.source)

    def _int(self, token: Token) -> int:
        try:
            return int(token)
        except ValueError:
            self.problems.append(Diagnostic("integer literal is too long", self._span(token)))
            return 0

    # statements (``parse`` transforms them one by one)
    def header(self, meta, children):
        name, description = children[0], children[1] if len(children) > 1 else None
        return ast.Header(str(name), _unescape(description) if description else "", self._span(meta))

    def let(self, meta, children):
        return ast.Let(str(children[0]), children[1], self._span(meta))

    def use(self, meta, children):
        return ast.Use(_unescape(children[0]), self._span(meta), self._span(children[0]))

    def declare(self, meta, children):
        return ast.Declare(str(children[0]), children[1], self._span(meta), self._span(children[0]))

    def rule(self, meta, children):
        selector, _arrow, placement, tuner = children
        return ast.Rule(selector, str(placement), tuner, self._span(meta), self._span(placement))

    def train(self, meta, children):
        return ast.Train(children[0], self._span(meta))

    def freeze(self, meta, children):
        return ast.Freeze(children[0], self._span(meta))

    def tuner(self, meta, children):
        args = children[1] if len(children) > 1 else ()
        return ast.TunerCall(str(children[0]), args, self._span(meta), self._span(children[0]))

    def args(self, meta, children):
        return tuple(children)

    def arg(self, meta, children):
        return ast.Arg(str(children[0]), children[1], self._span(meta))

    # selectors
    def selector(self, meta, children):
        paths: list[ast.Path] = []
        for child in children:
            if isinstance(child, ast.Chunks):
                paths[-1] = replace(paths[-1], chunks=child)
            else:
                paths.append(child)
        return ast.Selector(tuple(paths), self._span(meta))

    def path(self, meta, children):
        rooted = isinstance(children[0], Token) and children[0].type == "ROOT"
        run = children[-1] if isinstance(children[-1], ast.Run) else None
        segments = children[1 if rooted else 0:len(children) - (run is not None)]
        return ast.Path(tuple(segments), self._span(meta), rooted, span_site=run)

    def run(self, meta, children):
        start, op, end = children
        return ast.Run(str(start), str(end), op.type == "THROUGH", self._span(meta))

    def role_path(self, meta, children):
        role, *segments = children
        return ast.Path(tuple(segments), self._span(meta), rooted=True, role=str(role)[1:])

    def subpath(self, meta, children):
        return ast.Path(tuple(children), self._span(meta))

    def name(self, meta, children):
        indices = children[1] if len(children) > 1 else ()
        return ast.Name(str(children[0]), self._span(meta), indices)

    def number(self, meta, children):
        return ast.Name(str(children[0]), self._span(meta))

    def star(self, meta, children):
        return ast.Star(self._span(meta))

    def globstar(self, meta, children):
        return ast.GlobStar(self._span(meta))

    def group(self, meta, children):
        return ast.Group(tuple(children), self._span(meta))

    def indices(self, meta, children):
        return tuple(children)

    def single(self, meta, children):
        return ast.IndexRange(self._int(children[0]), None, True, self._span(meta))

    def range(self, meta, children):
        start, stop = (None if c is None else self._int(c) for c in children)
        return ast.IndexRange(start, stop, False, self._span(meta))

    def chunks(self, meta, children):
        *labels, count = children
        labels = tuple(str(label) for label in labels)
        indices = tuple(_chunk_index(label) for label in labels)
        if count is not None:
            count = self._int(count)
        elif any(label.isdigit() for label in labels):
            count = 0  # numeric chunks need `of N`; check says so
        else:
            count = 3  # q, k, v
        return ast.Chunks(labels, indices, count, self._span(meta))

    def chunk(self, meta, children):
        return children[0]

    # expressions
    def int(self, meta, children):
        return ast.Literal(self._int(children[0]), self._span(meta))

    def float(self, meta, children):
        return ast.Literal(float(children[0]), self._span(meta))

    def string(self, meta, children):
        return ast.Literal(_unescape(children[0]), self._span(meta))

    def true(self, meta, children):
        return ast.Literal(True, self._span(meta))

    def false(self, meta, children):
        return ast.Literal(False, self._span(meta))

    def ref(self, meta, children):
        return ast.Ref(str(children[0]), self._span(meta))

    def neg(self, meta, children):
        return ast.Neg(children[0], self._span(meta))

    def _binop(op):  # noqa: N805  (a method factory, used in the class body only)
        def build(self, meta, children):
            return ast.BinOp(op, children[0], children[-1], self._span(meta))
        return build

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")


def _chunk_index(label: str) -> int:
    """q, k, v are chunks 0, 1, 2; a number is itself; any other label is -1 (check rejects it)."""
    if label.isdigit():
        return int(label) if len(label) < 10 else -1
    return {"q": 0, "k": 1, "v": 2}.get(label, -1)
