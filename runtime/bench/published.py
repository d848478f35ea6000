"""Published results to print beside a bench's own row, read from ``published_<suite>.toml``.

Each row carries the per-task top-1 of one method as its paper printed it and the source it was
read in (paper, table, URL). Means are recomputed from the per-task numbers over exactly the tasks
the bench ran, so that a partial bench compares like with like; ``reported_mean`` is the paper's
own average (over every task), kept for reference.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = ["Source", "PublishedRow", "published_rows"]


@dataclass(frozen=True)
class Source:
    """Where rows were read: the paper, its table, its URL and the copy actually read."""

    id: str
    paper: str
    table: str
    url: str
    read_at: str = ""
    mean: str = "groups"
    params: str = ""
    note: str = ""


@dataclass(frozen=True)
class PublishedRow:
    method: str
    source: Source
    top1: dict[str, float] = field(default_factory=dict)
    params_m: float | None = None
    reported_mean: float | None = None


@lru_cache(maxsize=None)
def published_rows(family: str) -> tuple[PublishedRow, ...]:
    """The published rows of a suite family (``vtab1k``, ``fgvc``); none for others."""
    path = Path(__file__).with_name(f"published_{family}.toml")
    if not path.is_file():
        return ()
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    sources = {s["id"]: Source(**s) for s in data.get("source", [])}
    return tuple(PublishedRow(method=r["method"], source=sources[r["source"]],
                              top1={k: float(v) for k, v in r["top1"].items()},
                              params_m=r.get("params_m"), reported_mean=r.get("reported_mean"))
                 for r in data.get("row", []))
