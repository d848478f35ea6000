"""The spec AST: frozen dataclasses, each with the source span it was parsed from.

``parse`` builds these from text; ``check`` returns the same tree with ``let``/``use`` resolved and
tuner arguments validated (``Rule.args`` then holds a pydantic model instance).

Nodes are slotted (a spec of 100,000 rules is millions of nodes) and built by an ``__init__`` that
stores each field through its slot (see :func:`utdsl.records.record`); they compare, hash, print, pickle and
``dataclasses.replace`` as frozen dataclasses do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from .errors import Source, Span
from .records import record

__all__ = [
    "Name", "Star", "GlobStar", "Group", "Segment", "IndexRange", "Chunks", "Run", "Path", "Selector",
    "Expr", "Literal", "Ref", "BinOp", "Neg",
    "Arg", "TunerCall", "Header", "Let", "Use", "Rule", "Train", "Freeze", "Statement", "Spec",
]


# ---- selectors -------------------------------------------------------------------------------

@record
class IndexRange:
    """``[a:b]`` (``a`` or ``b`` may be None) or ``[i]`` (``stop`` is None, ``single`` True)."""

    start: int | None
    stop: int | None
    single: bool
    span: Span

    def contains(self, index: int) -> bool:
        if self.single:
            return index == self.start
        return (self.start is None or index >= self.start) and (self.stop is None or index < self.stop)

    def __str__(self) -> str:
        if self.single:
            return str(self.start)
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"


@record
class Name:
    """A literal path segment (``attn``, ``0``), optionally followed by a list of index ranges
    (``blocks[0:6]`` is the segment ``blocks`` followed by one numeric segment in 0..5;
    ``blocks[:2, 10:]`` one numeric segment in either range)."""

    text: str
    span: Span
    indices: tuple[IndexRange, ...] = ()

    def __str__(self) -> str:
        if not self.indices:
            return self.text
        return f"{self.text}[{', '.join(map(str, self.indices))}]"


@record
class Star:
    """``*``: exactly one segment."""

    span: Span

    def __str__(self) -> str:
        return "*"


@record
class GlobStar:
    """``**``: zero or more segments."""

    span: Span

    def __str__(self) -> str:
        return "**"


@record
class Group:
    """``(attn | mlp.fc1)``: one of several sub-paths."""

    paths: tuple["Path", ...]
    span: Span

    def __str__(self) -> str:
        return "(" + " | ".join(map(str, self.paths)) + ")"


Segment = Union[Name, Star, GlobStar, Group]


@record
class Chunks:
    """``{q, v}`` or ``{0, 2 of 3}``: parts of a fused output along its feature dimension."""

    labels: tuple[str, ...]        # as written: "q", "v", "0", "2"
    indices: tuple[int, ...]       # chunk indices
    count: int                     # how many equal chunks the output splits into
    span: Span

    def __str__(self) -> str:
        if all(label in "qkv" for label in self.labels) and self.count == 3:
            return "{" + ", ".join(self.labels) + "}"
        return "{" + ", ".join(self.labels) + f" of {self.count}" + "}"


@record
class Run:
    """``(norm2 .. drop_path2)`` after a path: a span site inside the selected module, from the
    input of its child ``start`` to the output of its child ``end`` (``inclusive``), or to the value
    ``end`` reads (``norm1 ..< norm2``)."""

    start: str
    end: str
    inclusive: bool
    span: Span

    def __str__(self) -> str:
        return f"({self.start} {'..' if self.inclusive else '..<'} {self.end})"


@record
class Path:
    """Dotted segments; matches any module path ending so unless ``rooted`` (written ``^a.b``).
    With a ``role`` (written ``@classifier.bias``) the segments follow the module(s) playing that
    role in the model (:data:`utdsl.roles.ROLES`)."""

    segments: tuple[Segment, ...]
    span: Span
    rooted: bool = False
    role: str | None = None
    chunks: "Chunks | None" = None     # a selector's alternative may tune parts of the output
    span_site: "Run | None" = None     # a run of operations inside the matched module

    def __str__(self) -> str:
        if self.role is not None:
            text = ".".join(["@" + self.role, *map(str, self.segments)])
        else:
            text = ("^" if self.rooted else "") + ".".join(map(str, self.segments))
        return text + (str(self.span_site) if self.span_site else "") + (str(self.chunks) if self.chunks else "")


@record
class Selector:
    """Alternatives ``a | b{q, v}``; each path's ``chunks`` restricts its matches to parts of
    their output."""

    paths: tuple[Path, ...]
    span: Span

    def __str__(self) -> str:
        return " | ".join(map(str, self.paths))


# ---- expressions -----------------------------------------------------------------------------

@record
class Literal:
    value: int | float | str | bool
    span: Span


@record
class Ref:
    """A reference to a ``let`` binding (bare identifiers that are not bindings are strings)."""

    name: str
    span: Span


@record
class BinOp:
    op: str  # one of + - * /
    left: "Expr"
    right: "Expr"
    span: Span


@record
class Neg:
    operand: "Expr"
    span: Span


Expr = Union[Literal, Ref, BinOp, Neg]


# ---- statements ------------------------------------------------------------------------------

@record
class Arg:
    name: str
    value: Expr
    span: Span


@record
class TunerCall:
    name: str
    args: tuple[Arg, ...]
    span: Span
    name_span: Span


@record
class Header:
    """``spec NAME "description"``."""

    name: str
    description: str
    span: Span


@record
class Let:
    name: str
    value: Expr
    span: Span


@record
class Use:
    """``use "other.ut"``; ``path_span`` is the span of the string."""

    path: str
    span: Span
    path_span: Span | None = None


@record
class Declare:
    """``tuner NAME = TUNER(ARGS)``: a tuner configuration that rules use by name."""

    name: str
    tuner: "TunerCall"
    span: Span
    name_span: Span


@record
class Rule:
    """``SELECTOR -> PLACEMENT TUNER(ARGS)``.

    After ``check``, ``args`` holds the validated pydantic arguments of the tuner and
    ``origin`` the path of the spec file the rule came from (differs from the top spec for ``use``);
    a rule naming a declared tuner holds the declaration's tuner call and, in ``declaration``, its
    name (the group whose sites share state).
    """

    selector: Selector
    placement: str
    tuner: TunerCall
    span: Span
    placement_span: Span
    args: Any = None
    origin: str | None = None
    declaration: str | None = None


@record
class Train:
    selector: Selector
    span: Span


@record
class Freeze:
    selector: Selector
    span: Span


Statement = Union[Header, Let, Use, Declare, Rule, Train, Freeze]


@dataclass(frozen=True)
class Spec:
    """A parsed (or checked) spec: its statements in order, its source and header."""

    statements: tuple[Statement, ...]
    source: Source
    name: str | None = None
    description: str = ""
    bindings: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(s for s in self.statements if isinstance(s, Rule))

    @property
    def param_rules(self) -> tuple[Train | Freeze, ...]:
        return tuple(s for s in self.statements if isinstance(s, (Train, Freeze)))
