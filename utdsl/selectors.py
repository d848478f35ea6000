"""Matching selectors against dotted module and parameter paths.

A path pattern matches a dotted path when its segments match a *suffix* of the path's segments
on segment boundaries (``attn.qkv`` matches ``blocks.3.attn.qkv``), or the whole path when it is
rooted (``^norm``). ``*`` is one segment, ``**`` any number (zero included), ``name[0:6]`` the
segment ``name`` followed by one integer segment in the range (``name[:2, 10:]``: in any of
the listed ranges), ``(a | b.c)`` any alternative. ``@classifier.bias`` starts at the module(s)
playing a role (:mod:`utdsl.roles`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping

from .syntax import GlobStar, Group, Name, Path, Segment, Selector, Star

__all__ = ["matches", "first_match", "matches_path", "generalize"]


def matches(selector: Selector, dotted: str, roles: Mapping[str, tuple[str, ...]] | None = None) -> bool:
    """Whether any alternative of ``selector`` matches ``dotted``. ``roles`` maps a role name to
    the paths of the modules playing it in the model (:func:`utdsl.roles.role_paths`); a role
    path matches nothing without it."""
    return first_match(selector, dotted, roles) is not None


def first_match(selector: Selector, dotted: str,
                roles: Mapping[str, tuple[str, ...]] | None = None) -> Path | None:
    """The first alternative of ``selector`` that matches ``dotted`` (its chunks are the ones a
    rule tunes there), or None."""
    parts = tuple(dotted.split(".")) if dotted else ()
    return next((path for path in selector.paths if matches_path(path, parts, roles)), None)


def matches_path(path: Path, parts: tuple[str, ...], roles: Mapping[str, tuple[str, ...]] | None = None) -> bool:
    last = path.segments[-1] if path.segments else None
    if isinstance(last, Name) and not last.indices and (not parts or parts[-1] != last.text):
        return False     # a plain last name matches the path's last segment: most paths fail here
    if path.role is not None:
        bases = [tuple(base.split(".")) for base in (roles or {}).get(path.role, ())]
        return any(parts[:len(base)] == base and len(parts) in _ends(path.segments, parts, len(base))
                   for base in bases)
    starts = (0,) if path.rooted else range(len(parts) + 1)
    return any(len(parts) in _ends(path.segments, parts, start) for start in starts)


def _ends(segments: tuple[Segment, ...], parts: tuple[str, ...], start: int) -> set[int]:
    """Every position at which ``segments`` can finish when matched from ``start``."""
    positions = {start}
    for segment in segments:
        positions = {end for position in positions for end in _segment_ends(segment, parts, position)}
        if not positions:
            break
    return positions


def _segment_ends(segment: Segment, parts: tuple[str, ...], at: int) -> set[int]:
    if isinstance(segment, Star):
        return {at + 1} if at < len(parts) else set()
    if isinstance(segment, GlobStar):
        return set(range(at, len(parts) + 1))
    if isinstance(segment, Group):
        return {end for path in segment.paths for end in _ends(path.segments, parts, at)}
    assert isinstance(segment, Name)
    if at >= len(parts) or parts[at] != segment.text:
        return set()
    end = at + 1
    if not segment.indices:
        return {end}
    # `blocks[:2, 10:]`: one numeric segment in any of the listed ranges
    if end >= len(parts) or not parts[end].isdigit():
        return set()
    number = int(parts[end])
    return {end + 1} if any(index.contains(number) for index in segment.indices) else set()


@lru_cache(maxsize=4096)
def generalize(dotted: str) -> str:
    """``blocks.3.attn.qkv`` -> ``blocks.*.attn.qkv``: the selector-shaped form of a path."""
    return ".".join("*" if part.isdigit() else part for part in dotted.split("."))
