"""User-facing errors: one exception family, rendered as ``file:line:col: error: message``.

Every error a user can cause (a spec, a model, a data set, a checkpoint) is a :class:`UtdslError`.
It carries a list of :class:`Diagnostic` so that tests can assert line and column exactly and a
stage can collect every problem of a spec before raising once.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .records import record

__all__ = [
    "Source",
    "Span",
    "Diagnostic",
    "UtdslError",
    "SpecError",
    "ModelError",
    "CheckpointError",
    "DataError",
    "closest",
    "raise_if_any",
]


@dataclass(frozen=True)
class Source:
    """The text of a spec and where it came from (a path, or ``<string>``)."""

    text: str
    path: str = "<string>"

    @property
    def is_spec_file(self) -> bool:
        """Whether the text is spec text or a ``.ut`` file: only then do errors quote its lines
        (``use "/etc/passwd"`` must not print a line of that file)."""
        return self.path.startswith("<") or self.path.endswith(".ut")

    @functools.cached_property
    def _lines(self) -> list[str]:  # split once: a spec with many errors quotes many lines
        return self.text.split("\n")

    def line(self, number: int) -> str:
        lines = self._lines
        return lines[number - 1].rstrip("\r") if 0 < number <= len(lines) else ""


@record
class Span:
    """A region of a source: 1-based line and column of its start and end (end exclusive)."""

    line: int
    column: int
    end_line: int
    end_column: int
    source: Source | None = field(default=None, compare=False, repr=False)

    @property
    def location(self) -> str:
        path = self.source.path if self.source else "<string>"
        return f"{path}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Diagnostic:
    """One problem: a message, where it is (if it is in a spec) and a hint."""

    message: str
    span: Span | None = None
    hint: str | None = None
    severity: str = "error"

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def render(self) -> str:
        if self.span is None:
            text = f"{self.severity}: {self.message}"
        else:
            text = f"{self.span.location}: {self.severity}: {self.message}"
            source = self.span.source
            source_line = source.line(self.span.line) if source and source.is_spec_file else ""
            if source_line:
                width = 1
                if self.span.end_line == self.span.line:
                    width = max(1, self.span.end_column - self.span.column)
                text += f"\n    {source_line}\n    {' ' * (self.span.column - 1)}{'^' * width}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class UtdslError(Exception):
    """Base of every error a user can cause; ``str()`` is the rendered message."""

    def __init__(self, message: str | None = None, *, diagnostics: Sequence[Diagnostic] = (),
                 span: Span | None = None, hint: str | None = None):
        self._verbatim = _worker_message(message, type(self).__name__) if not diagnostics else None
        if not diagnostics:
            diagnostics = [Diagnostic(message or "error", span, hint)]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__(self.render())

    def render(self) -> str:
        if self._verbatim is not None:
            return self._verbatim
        return "\n".join(d.render() for d in self.diagnostics)

    def __str__(self) -> str:  # exceptions pickle args; keep the rendering authoritative
        return self.render()


def _worker_message(message: str | None, name: str) -> str | None:
    """The rendered error inside a message that torch's DataLoader builds when it re-raises a
    worker's exception (``Caught DataError in DataLoader worker process 0. Original Traceback
    ...``): the user sees the error, not the worker's traceback."""
    if not message or not message.startswith("Caught ") or "Original Traceback" not in message:
        return None
    marker = f".{name}: "
    at = message.rfind(marker)
    return message[at + len(marker):].rstrip() if at >= 0 else None


class SpecError(UtdslError):
    """A spec is malformed or does not fit the model (syntax, arguments, selectors)."""


class ModelError(UtdslError):
    """A model name, weights file or model structure cannot be used."""


class CheckpointError(UtdslError):
    """A checkpoint is missing, corrupt or belongs to another model or spec."""


class DataError(UtdslError):
    """A data set root is missing or not laid out as its format requires."""


def closest(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.4) -> list[str]:
    """The ``n`` candidates closest to ``word`` (difflib ratio), best first."""
    return difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=n, cutoff=cutoff)


def listing(items: Iterable[str], most: int = 5) -> str:
    """``a, b, c and 4 more``: the first ``most`` items and a count of the rest."""
    items = list(items)
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str | None:
    """A ``did you mean`` hint or None when nothing is close."""
    found = closest(word, candidates, n=n)
    return "did you mean " + ", ".join(f"'{c}'" for c in found) + "?" if found else None


def raise_if_any(diagnostics: Sequence[Diagnostic], error: type[UtdslError] = SpecError) -> None:
    """Raise one error holding every error-severity diagnostic, if there is any."""
    errors = [d for d in diagnostics if d.severity == "error"]
    if errors:
        raise error(diagnostics=errors)
