"""Matching selectors against dotted module and parameter paths.

A path pattern matches a dotted path when its segments match a *suffix* of the path's segments
on segment boundaries (``attn.qkv`` matches ``blocks.3.attn.qkv``), or the whole path when it is
rooted (``^norm``). ``*`` is one segment, ``**`` any number (zero included), ``name[0:6]`` the
segment ``name`` followed by one integer segment in the range, ``(a | b.c)`` any alternative.
"""

from __future__ import annotations

from functools import lru_cache

from .syntax import GlobStar, Group, Name, Path, Segment, Selector, Star

__all__ = ["matches", "matches_path", "generalize"]


def matches(selector: Selector, dotted: str) -> bool:
    """Whether any alternative of ``selector`` matches ``dotted``."""
    parts = tuple(dotted.split(".")) if dotted else ()
    return any(matches_path(path, parts) for path in selector.paths)


def matches_path(path: Path, parts: tuple[str, ...]) -> bool:
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
    for index in segment.indices:
        if end >= len(parts) or not parts[end].isdigit() or not index.contains(int(parts[end])):
            return set()
        end += 1
    return {end}


@lru_cache(maxsize=4096)
def generalize(dotted: str) -> str:
    """``blocks.3.attn.qkv`` -> ``blocks.*.attn.qkv``: the selector-shaped form of a path."""
    return ".".join("*" if part.isdigit() else part for part in dotted.split("."))
