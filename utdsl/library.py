"""The method library: the ``.ut`` files shipped in ``specs/`` (the ``utdsl.specs`` package), found
by name (``lora`` or ``lora.ut``) as well as by path."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

from .errors import SpecError, did_you_mean

__all__ = ["library_dir", "library_specs", "find_spec", "is_spec_reference"]

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


def find_spec(reference: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """The file a spec reference names: a path (absolute, or relative to ``relative_to`` or the
    working directory) or a library name. SpecError with the closest library names otherwise."""
    path = Path(reference)
    candidates = [path] if path.is_absolute() else [
        *([relative_to / path] if relative_to else []), path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    name = path.name if path.suffix == ".ut" else path.name + ".ut"
    in_library = library_dir() / name
    if path.parent == Path(".") and in_library.is_file():
        return in_library
    names = [p.stem for p in library_specs()]
    searched = ", ".join(str(c) for c in candidates) + f", library {library_dir()}"
    raise SpecError(f"spec '{reference}' not found (searched {searched})",
                    hint=did_you_mean(path.stem, names) or "library specs: " + ", ".join(names))
