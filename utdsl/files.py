"""Files: writing so that a crash never leaves a half-written one, with the permissions the
user's umask gives any new file, and reading spec text with clean errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import SpecError

__all__ = ["atomic_write", "read_spec_text", "umask"]


def umask() -> int:
    """The process's file-mode creation mask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then move it onto
    ``path`` in one step (``os.replace``); on failure the temporary file is removed. The file
    gets mode ``0o666 & ~umask``, as ``open()`` would give it (``mkstemp`` makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_spec_text(path: str | os.PathLike) -> str:
    """The text of a spec file: UTF-8, a leading byte-order mark dropped; a file that is not
    UTF-8 text (or cannot be read) is a :class:`SpecError` naming the first bad byte."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SpecError(f"cannot read spec file '{path}': {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SpecError(f"spec file '{path}' is not UTF-8 text: byte 0x{data[error.start]:02x} at line {line} "
                        f"(offset {error.start})", hint="save the spec as UTF-8") from None
    if "\0" in text:
        raise SpecError(f"spec file '{path}' is not a text file (it holds NUL bytes)")
    return text
