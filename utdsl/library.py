"""The method library and spec lookup: the ``.ut`` files shipped in ``specs/`` (the
``utdsl.specs`` package) are found by name (``lora`` or ``lora.ut``) as well as by path."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Sequence

from .errors import SpecError, did_you_mean

__all__ = ["library_dir", "library_specs", "locate_spec", "find_spec", "is_spec_reference"]

_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.ut)?$")


def library_dir() -> Path:
    return Path(str(resources.files("utdsl.specs")))


def library_specs() -> list[Path]:
    """Every spec of the library, sorted by name."""
    return sorted(library_dir().glob("*.ut"))


def is_spec_reference(text: str) -> bool:
    """Whether ``text`` names a spec file or a library spec (rather than being spec text)."""
    if "\n" in text or "->" in text:
        return False
    return Path(text).is_file() or bool(_NAME.match(text.strip()))


def locate_spec(name: str, relative_to: str = "", search_paths: Sequence[str] = ()) -> tuple[str | None, list[str]]:
    """The file a spec reference names, and every place looked at, in order: as written and with
    ``.ut`` added, in ``relative_to`` (the working directory when empty), in ``search_paths``, then,
    for a bare name, in the library."""
    names = [name] if name.endswith(".ut") else [name, name + ".ut"]
    if os.path.isabs(name):
        candidates = names
    else:
        candidates = [os.path.join(d, n) for d in (relative_to, *search_paths) for n in names]
        if os.path.basename(name) == name:
            candidates += [str(library_dir() / n) for n in names]
    found = next((c for c in candidates if name and os.path.isfile(c)), None)
    return found, candidates


def find_spec(reference: str | os.PathLike) -> Path:
    """The file a spec reference names (see :func:`locate_spec`); SpecError with the closest
    library names otherwise."""
    found, searched = locate_spec(str(reference))
    if found is not None:
        return Path(found)
    names = [p.stem for p in library_specs()]
    raise SpecError(f"spec '{reference}' not found (searched {', '.join(searched)})",
                    hint=did_you_mean(Path(str(reference)).stem, names) or "library specs: " + ", ".join(names))
